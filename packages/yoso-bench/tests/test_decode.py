"""``yoso bench --decode``: a tiny run end to end (seconds), the JSON it leaves, its refusals.

Tiny contexts and a tiny budget: these check the harness, never speed.
"""

from __future__ import annotations

import json

import pytest

from yoso.cli import main
from yoso_bench import decode

pytest.importorskip("torch")

TINY = ["--decode", "--n", "64,128,256", "--batch", "1", "--heads", "2", "--dim", "8", "--budget", "0.01"]
SMALL = ["--num-hashes", "4", "--hash-bits", "3"]


def test_tiny_decode_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", *TINY, *SMALL, "--backend", "reference", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads((out / "decode.json").read_text())
    decode.validate(data)
    assert (out / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [m["id"] for m in data["methods"]] == ["sdpa-kv-cache", "reference/yoso-4"]
    rows = {(r["method"], r["context"]): r for r in data["results"]}
    assert len(rows) == 2 * 3 and all(r["status"] == "ok" for r in rows.values())
    # The KV cache grows with the context; the state does not: m * 2**tau * D floats per head.
    assert [rows["sdpa-kv-cache", n]["kept_bytes"] for n in (64, 128, 256)] == [
        2 * 2 * (n + 1) * 8 * 4 for n in (64, 128, 256)
    ]
    assert {rows["reference/yoso-4", n]["kept_bytes"] for n in (64, 128, 256)} == {2 * 4 * 8 * 8 * 4}
    assert all(rows["reference/yoso-4", n].get("ratio_to_kv_cache") for n in (64, 128, 256))
    summary = {s["method"]: s for s in data["summary"]}
    assert summary["sdpa-kv-cache"]["contexts"] == [64, 128, 256] and isinstance(
        summary["sdpa-kv-cache"]["slope"], float
    )
    assert "faster_than_kv_cache_from" in summary["reference/yoso-4"]
    assert data["machine"]["torch_threads"] == 1
    printed = capsys.readouterr().out
    assert "| context | SDPA + KV cache | N-YOSO-4 state (reference, numpy) |" in printed


def test_the_state_is_the_prefilled_one(tmp_path):
    """The state a point decodes from is a real causal prefill: its tables sum every prefilled token's value
    once per hash."""
    import argparse

    from yoso_bench.options import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = decode.config_from_args(parser.parse_args([*TINY, *SMALL, "--backend", "reference", "--out", "x"]))
    tables, planes = decode.prefill_tables(config, 100)
    assert tables.shape == (1, 2, 4, 8, 8) and planes.shape == (4, 3, 8)
    # sum over buckets of each hash = the sum of all values, the same for every hash
    per_hash = tables.sum(axis=3)
    assert abs(per_hash - per_hash[:, :, :1]).max() < 1e-3 and abs(per_hash).max() > 0


@pytest.mark.parametrize(
    "args, match",
    [
        (["--device", "cuda"], "--device cuda|runs on the CPU"),
        (["--hash-bits", "auto"], "fixed --hash-bits"),
        (["--dtype", "bfloat16"], "float32 only"),
    ],
)
def test_decode_refusals(tmp_path, capsys, args, match):
    assert main(["bench", *TINY, "--backend", "reference", "--out", str(tmp_path), *args]) != 0
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)
