"""One YOSO attention layer over a sequence too long for one process, split over several.

Each process holds ``N / R`` rows of ``q, k, v [B, H, N, D]`` and calls
``yoso.attention(q, k, v, ..., group=torch.distributed.group.WORLD)``: forward and backward, timed, with the
bytes each rank sends counted (``yoso_parallel.recording``). ``--memory-gib`` caps what each
process may add to its address space once torch, JAX and the process group are up (``RLIMIT_AS``), so the
same budget can be tried with one process and with several:

    # four processes with torchrun (or on four machines: --nnodes, --rdzv-endpoint)
    torchrun --standalone --nproc-per-node 4 examples/sequence_parallel.py --seq-len 1048576 --memory-gib 1.25
    # the same without torchrun: this script starts the four processes itself (same environment variables)
    python examples/sequence_parallel.py --spawn 4 --seq-len 1048576 --memory-gib 1.25
    # one process, the same budget: runs out of memory
    python examples/sequence_parallel.py --spawn 1 --seq-len 1048576 --memory-gib 1.25

``group=`` comes with the yoso-parallel package (``pip install -e packages/yoso-parallel`` here). On GPUs
(one per rank, NCCL) add ``--device cuda``: the tensors stay on the CPU, where a table-capable
backend computes, and the messages go over NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

OUT_OF_MEMORY = 3


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=1 << 20, help="the whole sequence length N (default 1048576)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dim", type=int, default=32, help="head dim D = Dv (default 32)")
    p.add_argument("--num-hashes", type=int, default=16)
    p.add_argument("--hash-bits", type=int, default=8)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--memory-gib", type=float, help="per-process cap on the address space it may add (RLIMIT_AS)")
    p.add_argument("--spawn", type=int, metavar="R", help="start R processes here instead of under torchrun")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: NCCL messages, one GPU per rank")
    p.add_argument("--backend", help="the yoso backend (default: automatic; jax on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- the launcher (--spawn) -------------------------------------------------------------------------


def spawn(args, argv) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    own = [a for i, a in enumerate(argv) if a != "--spawn" and (i == 0 or argv[i - 1] != "--spawn")]
    own = [a for a in own if not a.startswith("--spawn=")]
    threads = str(max(1, (os.cpu_count() or 1) // args.spawn))
    procs = []
    for rank in range(args.spawn):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(args.spawn),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("OMP_NUM_THREADS", threads)
        procs.append(subprocess.Popen([sys.executable, __file__, *own], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"exit codes by rank: {codes}" + (" (out of memory)" if OUT_OF_MEMORY in codes else ""))
    return max(codes, key=abs)


# ---- one rank ---------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or any(w in text for w in ("alloc", "out of memory", "resource_exhausted"))


def rank_main(args) -> int:
    import resource

    import torch
    import torch.distributed as dist

    import yoso
    from yoso_parallel import recording as sequence_parallel_traffic

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a lone process without torchrun or --spawn
        os.environ["MASTER_PORT"] = "29500"
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    if args.seq_len % world:
        raise SystemExit(f"--seq-len {args.seq_len} does not split evenly over {world} processes")
    n = args.seq_len // world
    options = dict(
        seed=args.seed,
        num_hashes=args.num_hashes,
        hash_bits=args.hash_bits,
        causal=args.causal,
        group=dist.group.WORLD,
    )
    shape = (args.batch, args.heads, n, args.dim)

    def layer(q, k, v):
        out = yoso.attention(q, k, v, **options)
        dist.barrier()
        return out

    with yoso.set_backend(args.backend):
        # A small call first: the backend's runtime (JAX's client, its thread pools) starts outside the budget.
        tiny = torch.randn(args.batch, args.heads, 8, args.dim, requires_grad=True)
        layer(tiny, tiny, tiny).sum().backward()
        backend = yoso.backend_for(tiny, tiny, tiny, **options)
        before = _status("VmSize")
        if args.memory_gib is not None:
            limit = before + int(args.memory_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        result = dict(rank=rank, world=world, n=args.seq_len, rows=n, backend=backend, budget_gib=args.memory_gib)
        code = 0
        try:
            torch.manual_seed(args.seed + rank)
            q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
            with sequence_parallel_traffic() as traffic:
                start = time.perf_counter()
                out = layer(q, k, v)
                result["forward_s"] = time.perf_counter() - start
                start = time.perf_counter()
                out.backward(torch.ones_like(out))
                dist.barrier()
                result["backward_s"] = time.perf_counter() - start
            result.update(traffic.summary())
            result["grads"] = "tables" if any(t.what == "lower-bound tables" for t in traffic.transfers) else "ring"
            result["finite"] = bool(all(torch.isfinite(t.grad).all() for t in (q, k, v)))
        except Exception as exc:  # noqa: BLE001 - the point of the budget
            if not _out_of_memory(exc):
                raise
            result["out_of_memory"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            code = OUT_OF_MEMORY
        result["address_space_added_gib"] = (_status("VmPeak") - before) / 2**30
        result["peak_rss_gib"] = _status("VmHWM") / 2**30
    print(json.dumps(result), flush=True)
    if code:
        os._exit(code)  # the other ranks may be waiting in a collective that will never come
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        summary(args, gathered)
    dist.destroy_process_group()
    return 0


def summary(args, rows) -> None:
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    first = rows[0]
    print(
        f"\nN = {args.seq_len} over {first['world']} processes ({first['rows']} rows each), B = {args.batch}, "
        f"H = {args.heads}, D = Dv = {args.dim}, m = {args.num_hashes}, tau = {args.hash_bits}, "
        f"{'causal' if args.causal else 'non-causal'}, backend {first['backend']}, "
        f"budget {args.memory_gib if args.memory_gib is not None else 'none'} GiB per process"
    )
    sent = mib(max(r["forward_sent_bytes"] for r in rows))
    print(f"forward  {max(r['forward_s'] for r in rows):7.2f} s   sent per rank (max) {sent}")
    print(
        f"backward {max(r['backward_s'] for r in rows):7.2f} s   sent per rank (max) "
        f"{mib(max(r['backward_sent_bytes'] for r in rows))} (dq, dk by {first['grads']})"
    )
    print(
        f"address space added per process (max) {max(r['address_space_added_gib'] for r in rows):.2f} GiB, "
        f"peak resident (max) {max(r['peak_rss_gib'] for r in rows):.2f} GiB; gradients finite: "
        f"{all(r['finite'] for r in rows)}"
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.spawn is not None and "RANK" not in os.environ:
        return spawn(args, argv)
    return rank_main(args)


if __name__ == "__main__":
    sys.exit(main())
