"""``yoso bench --sequence-parallel``: two gloo processes on a tiny grid; the bytes counted on each rank equal
the model's, the non-causal forward's do not grow with N, ring attention's do. Checks the harness, not speed."""

from __future__ import annotations

import json

import pytest

from yoso.cli import main

pytest.importorskip("torch")

TINY = ["--n", "64,256", "--heads", "1", "--dim", "8", "--num-hashes", "4", "--hash-bits", "3", "--repeats", "1"]


def test_two_ranks_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--sequence-parallel", "2", *TINY, "--backend", "reference", "--out", str(out)]) == 0
    data = json.loads((out / "sequence_parallel.json").read_text())
    assert data["schema"] == "yoso-bench-sp/1" and data["process_group"] == "gloo" and data["backend"] == "reference"
    small, large = data["points"]
    # One all-reduce of B*H*m*2^tau*Dv float32 numbers, 2(R-1)/R of it sent: whatever N.
    table = 1 * 4 * 2**3 * 8 * 4
    assert small["forward_sent_bytes"] == large["forward_sent_bytes"] == table
    for point in (small, large):
        assert point["forward_sent_bytes_per_rank"] == [table, table]
        assert point["forward_sent_bytes"] == point["model"]["forward"]
        assert point["backward_sent_bytes"] == pytest.approx(point["model"]["backward"])
        assert point["grads"] == point["model"]["grads"]
    assert large["model"]["ring_attention_forward"] == 4 * small["model"]["ring_attention_forward"]
    printed = capsys.readouterr().out
    assert "sequence parallel: 2 ranks (gloo)" in printed and "crossover lengths" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sequence-parallel", "3", "--n", "64"], "split evenly"),
        (["--sequence-parallel", "2", "--hash-bits", "auto"], "--hash-bits auto"),
        (["--sequence-parallel", "0"], "number of processes"),
    ],
)
def test_bad_options(args, message, capsys):
    assert main(["bench", *args]) != 0
    assert message in capsys.readouterr().err


def test_names_the_package_it_needs(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    absent = lambda name, *args: None if name == "yoso_parallel" else real(name, *args)
    monkeypatch.setattr(importlib.util, "find_spec", absent)
    assert main(["bench", "--sequence-parallel", "2", *TINY]) != 0
    assert "needs the yoso-parallel package" in capsys.readouterr().err
