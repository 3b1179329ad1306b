"""Sequence parallelism: ``group=`` over torch.distributed (gloo, 2 and 4 CPU processes on the loopback
address) and ``axis_name=`` inside ``jax.shard_map`` (4 host devices, in a process of its own: XLA's
device count is fixed when JAX starts). Every rank's output and gradients must equal its slice of the
one-process result with the same hash functions (``sp_cases.py`` lists the cases); the communication
counted per rank must follow the model, and the non-causal forward's must not grow with N.

One spawn per world size runs every case: starting a process that imports torch costs seconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env.pop("YOSO_BACKEND", None)
    return env


def _spawn_torch(tmp_path: Path, world: int, device: str = "cpu") -> list[dict]:
    init = f"tcp://127.0.0.1:{_free_port()}"
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "sp_torch_worker.py"), str(r), str(world), init, str(out), device],
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r, out in enumerate(outs)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"a rank of the world of {world} did not finish in {TIMEOUT_S} s")
    results = []
    for r, (out, log) in enumerate(zip(outs, logs)):
        assert out.exists(), f"rank {r} wrote no result; its output:\n{log[-4000:]}"
        results.append(json.loads(out.read_text()))
    return results


def _table_bytes(world: int, payload: int) -> float:
    return 2 * (world - 1) / world * payload


@pytest.mark.parametrize("world", [2, 4])
def test_torch_distributed(tmp_path, world):
    pytest.importorskip("torch")
    results = _spawn_torch(tmp_path, world)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)

    for rank, r in enumerate(results):
        # Disagreeing ranks: the same ValueError on every rank.
        assert r["errors"] and all(v == "ok" for v in r["errors"].values()), (rank, r["errors"])
        t = r["traffic"]
        # Non-causal forward: one all-reduce of the value tables, B*H*m*2^tau*Dv float64 numbers,
        # whatever the length.
        table = 1 * 2 * 4 * 2**3 * 8 * 8
        for n in (8, 32):
            assert t[f"causal=False,n={n}"]["forward_sent_bytes"] == pytest.approx(_table_bytes(world, table))
        # Causal forward: a chain of prefix sums, one table sent by every rank but the last.
        expected = 0 if rank == world - 1 else table
        assert t["causal=True,n=8"]["forward_sent_bytes"] == t["causal=True,n=32"]["forward_sent_bytes"] == expected
        # The ring backward grows with N (K/V blocks), the tables of output gradients do not.
        assert t["causal=False,n=32"]["backward_sent_bytes"] > t["causal=False,n=8"]["backward_sent_bytes"]
        rows = [x for x in t["causal=False,n=32"]["transfers"] if x["what"] == "keys and dk"]
        assert rows and rows[0]["count"] == world - 1
        # keys (8), values (8) and dk (8) float64 per row, 2 heads, 32 rows.
        assert rows[0]["payload_bytes"] == (world - 1) * 2 * 32 * (8 + 8 + 8) * 8


def test_torch_nccl(tmp_path):
    """The same code over NCCL (messages on the GPU, one per rank); skipped without GPUs."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs CUDA GPUs and NCCL")
    world = min(2, torch.cuda.device_count())
    results = _spawn_torch(tmp_path, world, device="cuda")
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


def test_jax_shard_map(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "jax.json"
    env = _environment()
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_ENABLE_X64"] = "1"
    run = subprocess.run(
        [sys.executable, str(HERE / "sp_jax_worker.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert out.exists(), f"the JAX run wrote no result:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert not result["failures"], "\n".join(result["failures"])
    assert result["errors"] and all(v == "ok" for v in result["errors"].values()), result["errors"]


# ---- refusals that need no second process ---------------------------------------------------------


def test_group_must_be_a_process_group():
    torch = pytest.importorskip("torch")
    import yoso

    x = torch.ones(4, 8)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        yoso.attention(x, x, x, seed=0, group="world")


def test_axis_name_must_be_bound():
    jnp = pytest.importorskip("jax.numpy")
    import yoso

    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match="axis_name='sp' is not a mesh axis bound here"):
        yoso.attention(x, x, x, seed=0, axis_name="sp")
    with pytest.raises(ValueError, match="seed=None draws hash functions per process"):
        yoso.attention(x, x, x, axis_name="sp")
    with pytest.raises(TypeError, match="axis_name must be the name"):
        yoso.attention(x, x, x, seed=0, axis_name=3)


def test_communication_model_crossover():
    import yoso_parallel as sp

    # The example: m = 32, tau = 8, D = Dv = 64: the lower bound's tables are 134 MB per head.
    big = sp.model(size=4, n=1 << 16, batch=1, dim=64, value_dim=64, num_hashes=32, hash_bits=8)
    assert big["grads"] == "ring"  # 64k tokens: a ring pass is far cheaper than 2 x 134 MB of tables
    assert 32 * 256 * 64 * 64 * 4 == 134217728
    small = sp.model(size=4, n=1 << 16, batch=1, dim=8, value_dim=8, num_hashes=2, hash_bits=3)
    assert small["grads"] == "tables"
    # The forward's bytes do not depend on N; the ring attention's grow linearly.
    other = sp.model(size=4, n=1 << 18, batch=1, dim=64, value_dim=64, num_hashes=32, hash_bits=8)
    assert other["forward"] == big["forward"]
    assert other["ring_attention_forward"] == pytest.approx(4 * big["ring_attention_forward"])
    n = big["crossover_forward"]
    at = sp.model(size=4, n=int(n), batch=1, dim=64, value_dim=64, num_hashes=32, hash_bits=8)
    assert at["ring_attention_forward"] == pytest.approx(at["forward"], rel=1e-3)
