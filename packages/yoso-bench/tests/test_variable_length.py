"""``yoso bench --variable-length``: a tiny run end to end (seconds), the JSON it leaves, its refusals.

Tiny shapes: these check the harness (the same call stream for every method, the gradients it times), never
speed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from yoso.cli import main
from yoso_bench import variable_length

torch = pytest.importorskip("torch")

TINY = ["--variable-length", "--n", "8,40", "--batch", "3", "--heads", "2", "--dim", "8", "--repeats", "5"]
SMALL = ["--num-hashes", "4", "--hash-bits", "3"]


def test_tiny_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", *TINY, *SMALL, "--backend", "reference", "--out", str(out)]) == 0
    data = json.loads((out / "variable_length.json").read_text())
    assert data["schema"] == variable_length.SCHEMA
    assert [m["method"] for m in data["methods"]] == ["sdpa", "reference"]
    streams = [[c["n"] for c in m["calls"]] for m in data["methods"]]
    assert streams[0] == streams[1] and len(streams[0]) == 5 and all(8 <= n <= 40 for n in streams[0])
    for m in data["methods"]:
        assert m["total_s"] == pytest.approx(sum(c["seconds"] for c in m["calls"]))
        assert m["compilations"] == 0  # neither SDPA nor the NumPy reference compiles
    assert "reference:" in capsys.readouterr().out


def test_calls_pad_each_row_to_its_own_length():
    config = variable_length.VariableLengthConfig(
        backends=("reference",), batch=6, heads=1, dim=4, num_hashes=4, hash_bits=3, lengths=(5, 30), calls=3, out=None
    )
    q, k, v, g, mask = variable_length.call_inputs(config, 2)
    n = q.shape[2]
    assert mask.shape == (6, n) and mask.dtype == torch.bool
    lengths = mask.sum(dim=1).numpy()
    assert lengths.max() == n and lengths.min() >= 1
    assert (mask.numpy() == (np.arange(n)[None, :] < lengths[:, None])).all()  # a prefix per row
    again = variable_length.call_inputs(config, 2)  # the stream depends on the seed and the index alone
    assert torch.equal(again[0], q) and torch.equal(again[4], mask)


def test_one_call_has_the_gradients_of_the_masked_attention():
    """The timed step computes what a training step does: gradients of the padded call, zero for masked keys."""
    config = variable_length.VariableLengthConfig(
        backends=("reference",), batch=2, heads=1, dim=4, num_hashes=4, hash_bits=3, lengths=(6, 12), calls=1, out=None
    )
    inputs = variable_length.call_inputs(config, 0)
    dq, dk, dv = variable_length._step(config, "reference")(*inputs)
    mask = inputs[4]
    assert dq.shape == inputs[0].shape and torch.isfinite(dq).all()
    assert (dk[~mask[:, None, :].expand_as(dk[..., 0])] == 0).all() and (dv.abs().sum() > 0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n", "8,16,32"], "MIN,MAX"),
        (["--n", "8"], "MIN,MAX"),
        (["--repeats", "0"], "--repeats"),
        (["--decode"], "separate benchmarks"),
        (["--hash-bits", "auto"], "fixed --hash-bits"),
    ],
)
def test_refusals(tmp_path, capsys, extra, message):
    assert main(["bench", *TINY, *extra, "--backend", "reference", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
