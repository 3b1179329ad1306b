"""A script that calls yoso.attention on torch tensors through a JAX backend and ends at once exits cleanly.

JAX frees the buffers viewing torch memory (the DLPack crossing) on its worker threads, and torch's
deleter needs the GIL; without the glue's exit grace, a script ending within milliseconds of its last
call aborted in interpreter finalization ("terminate called without an active exception", status 134)
in about a third of the runs. The race is random, so each run of this test can only catch a regression
with some probability: three fresh interpreters miss it about one time in three (0.7^3).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("torch")

SCRIPT = """
import torch, yoso
q, k, v = (torch.randn(1, 8, 1024, 64, requires_grad=True) for _ in range(3))
with yoso.set_backend("jax"):
    out = yoso.attention(q, k, v, seed=0)  # 2 MiB inputs: they cross into JAX by DLPack, without a copy
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
print("done", flush=True)
"""


@pytest.mark.parametrize("run", range(3))
def test_script_ending_right_after_a_call_exits_cleanly(run):
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "done", done.stderr[-2000:]
    assert "terminate called" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-2000:]}"
