"""Sequence parallelism on torch.distributed: ``yoso.attention(q, k, v, ..., group=PG)``.

Each rank passes its contiguous slice of the sequence (ranks in order); the result is its slice of the
full-sequence result, and autograd gives its slice of the gradients. The composition is
``yoso_parallel._composition`` (framework-neutral, on the backend's arrays); this module is the ``torch``
engine of the ``yoso.parallel`` entry points (``check`` and ``attention``, see ``yoso._parallel``) and
supplies the collectives over a process group and the autograd around them:

* :class:`TorchCollectives`: ``all_reduce``; exclusive prefix / suffix sums as a chain of point-to-point
  messages (each rank sends at most one table); a ring shift with ``batch_isend_irecv``. Backend arrays
  (NumPy, or JAX through DLPack) are viewed as CPU tensors and moved to the group's device for the
  message: the CPU for gloo, the current CUDA device for NCCL, so the same code runs over both.
* One ``torch.autograd.Function`` around the core, with the normalisations and masks outside it in
  ordinary torch code (``yoso._parallel.glue_helpers("torch")``, as the glue does for one process). Every
  rank must run the backward: it communicates too. ``torch.compile`` does not trace this path: it runs
  eagerly (``torch.compiler.disable``), a graph break, so ``fullgraph=True`` refuses it.
* Before the first collective the ranks exchange their layouts (one small all-gather), so a call whose
  ranks disagree -- options, head dims, hash functions, masks given on some ranks only -- raises the same
  ``ValueError`` on every rank (:func:`check_ranks_agree`) instead of hanging.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from yoso._parallel import SAME_HASHES, glue_helpers
from yoso.backends import BACKWARDS, FLOAT_DTYPES, HASHINGS, MODES

from . import _composition as sp

glue = glue_helpers("torch")


@dataclass(frozen=True)
class Group:
    """A checked ``group=``: the process group and this process's rank in it."""

    group: object
    size: int
    rank: int


def check(group, *, planes, key, lengths) -> Group:
    """The local rules of ``group=``: a ProcessGroup of an initialised torch.distributed that this process
    is a member of. What the ranks must agree on is checked when the call runs (:func:`exchange_layouts`)."""
    if not dist.is_available():
        raise ValueError("group= needs torch.distributed, which this torch build lacks")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD or "
            f"torch.distributed.new_group(...)), got {type(group).__name__}"
        )
    if not dist.is_initialized():
        raise ValueError("group= needs torch.distributed.init_process_group() to have run in this process")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group=; call yoso.attention on the group's ranks only")
    return Group(group=group, size=dist.get_world_size(group), rank=rank)


def _device_for(group, like: torch.Tensor) -> torch.device:
    """Where the group's messages live: the inputs' device if they are on a GPU, the current CUDA device
    for an NCCL-only group, else the CPU."""
    if like.device.type != "cpu":
        return like.device
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TorchCollectives(sp.Collectives):
    def __init__(self, group, *, framework: str, device: torch.device, lengths: tuple[int, ...] = ()):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.framework = framework  # the backend's arrays: numpy, jax or torch
        self.device = device
        self.lengths = lengths

    # ---- between the backend's arrays and messages ------------------------------------------------
    def _message(self, x) -> torch.Tensor:
        """A contiguous tensor on the group's device holding ``x`` (a copy: collectives work in place,
        and a JAX array's memory is immutable); bool as uint8 (portable across process-group backends)."""
        if isinstance(x, torch.Tensor):
            t = x
        elif isinstance(x, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(x))
        else:
            t = torch.from_dlpack(x)  # a JAX array on the CPU: no copy yet
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        return t.to(self.device, copy=True).contiguous()

    def _back(self, t: torch.Tensor, like):
        """A received tensor as an array of the backend's framework, with ``like``'s dtype."""
        if _is_bool(like):
            t = t.bool()
        if self.framework == "torch":
            return t.to(like.device)
        t = t.cpu()
        if self.framework == "numpy":
            return t.numpy()
        return glue_helpers("jax").from_host(t)

    def _peer(self, rank: int) -> int:
        return rank % self.size

    # ---- the collectives ----------------------------------------------------------------------------
    def all_reduce(self, x, *, what):
        t = self._message(x)
        dist.all_reduce(t, group=self.group)
        return self._back(t, x)

    def _chain(self, x, *, forward: bool):
        """Running sums along the ranks (forward: 0 -> 1 -> ...; else backwards): each rank receives the
        sum of the ranks before it in that direction, adds its own and sends it on."""
        own = self._message(x)
        before, after = (self.rank - 1, self.rank + 1) if forward else (self.rank + 1, self.rank - 1)
        if 0 <= before < self.size:
            received = torch.empty_like(own)
            dist.recv(received, group=self.group, group_src=before)
        else:
            received = torch.zeros_like(own)
        if 0 <= after < self.size:
            dist.send(received + own, group=self.group, group_dst=after)
        return self._back(received, x)

    def exclusive_prefix(self, x, *, what):
        return self._chain(x, forward=True)

    def exclusive_suffix(self, x, *, what):
        return self._chain(x, forward=False)

    def ring_shift(self, arrays, *, hops, what):
        origin = (self.rank - hops) % self.size  # whose block arrives
        rows = self.lengths[origin]
        sends = [self._message(a) for a in arrays]
        received = [torch.empty((s.shape[0], rows) + tuple(s.shape[2:]), dtype=s.dtype, device=s.device) for s in sends]
        ops = [dist.P2POp(dist.isend, s, group=self.group, group_peer=self._peer(self.rank + 1)) for s in sends]
        ops += [dist.P2POp(dist.irecv, r, group=self.group, group_peer=self._peer(self.rank - 1)) for r in received]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return tuple(self._back(r, a) for r, a in zip(received, arrays))

    def earlier(self, hops):
        return self.rank - hops >= 0

    def concatenate(self, arrays):
        if self.framework == "numpy":
            return np.concatenate(arrays, axis=1)
        if self.framework == "torch":
            return torch.cat(arrays, dim=1)
        import jax.numpy as jnp

        return jnp.concatenate(arrays, axis=1)

    def scan_bytes(self, op, nbytes, rank):
        return sp.chain_bytes(self.size, op, nbytes, rank)


def _is_bool(x) -> bool:
    return str(x.dtype).removeprefix("torch.") == "bool"


# ---- the ranks' layouts -----------------------------------------------------------------------------

# What every rank of a group= call must agree on (the key and query counts may differ per rank).
RANK_FIELDS = (
    "batch",
    "lead",
    "dim",
    "value_dim",
    "dtype",
    "mode",
    "hashing",
    "backward",
    "causal",
    "normalize",
    "num_hashes",
    "hash_bits",
    "key_padding_mask",
    "query_mask",
    "requires_grad",
    "planes",
)


def check_ranks_agree(layouts: list[dict], *, described: dict[str, list]) -> None:
    """Refuse a ``group=`` call whose ranks disagree. ``layouts``: one dict per rank of :data:`RANK_FIELDS`
    as numbers (all ranks receive all of them, so every rank raises the same error instead of some
    waiting forever in a collective); ``described``: per field, each rank's value as the error shows it."""
    first = layouts[0]
    for name in RANK_FIELDS:
        values = [row[name] for row in layouts]
        if name == "planes":
            # Sums computed on each rank (float64): equal hash functions agree to rounding.
            scale = max(1.0, max(abs(x) for v in values for x in v))
            if any(abs(a - b) > 1e-9 * scale for v in values for a, b in zip(v, first[name])):
                raise ValueError(f"the ranks' hash functions differ (checksums {described[name]}): {SAME_HASHES}")
            continue
        if any(v != first[name] for v in values):
            shown = ", ".join(f"rank {r}: {d}" for r, d in enumerate(described[name]))
            what = {
                "lead": "the leading (batch/head) dims",
                "batch": "the leading (batch/head) dims",
                "key_padding_mask": "whether key_padding_mask is given",
                "query_mask": "whether query_mask is given",
                "requires_grad": "whether the call is differentiated (every rank must run the backward)",
            }.get(name, name)
            raise ValueError(
                f"yoso.attention(group=...): the ranks disagree on {what} ({shown}); every rank passes its "
                "slice of one sequence with the same options, leading and head dims"
            )
    for r, row in enumerate(layouts):
        if row["causal"] and row["n_query"] != row["n_key"]:  # pragma: no cover - refused locally first
            raise ValueError(f"causal=True needs as many queries as keys on every rank; rank {r} differs")


def _planes_checksums(planes: torch.Tensor | None) -> tuple[float, float]:
    if planes is None:
        return (0.0, 0.0)
    flat = planes.detach().reshape(-1).to(torch.float64)
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return (float(flat.sum()), float((flat * weights).sum()))


def _layout(prep) -> tuple[dict, dict]:
    """This rank's :data:`RANK_FIELDS` (and query/key counts) as numbers, and as the error shows them."""
    call = prep.call
    lead = zlib.crc32(repr(tuple(prep.lead)).encode())
    planes = _planes_checksums(prep.planes)
    values = dict(
        batch=call.batch,
        lead=lead,
        dim=call.dim,
        value_dim=call.value_dim,
        dtype=FLOAT_DTYPES.index(call.dtype),
        mode=MODES.index(call.mode),
        hashing=HASHINGS.index(call.hashing),
        backward=BACKWARDS.index(call.backward),
        causal=int(call.causal),
        normalize=int(prep.normalize),
        num_hashes=call.num_hashes,
        hash_bits=call.hash_bits,
        key_padding_mask=int(prep.key_mask is not None),
        query_mask=int(prep.query_mask is not None),
        requires_grad=int(call.requires_grad),
        planes=planes,
        n_query=call.n_query,
        n_key=call.n_key,
    )
    shown = dict(
        values,
        lead=f"{list(prep.lead)} (checksum {lead})",
        dtype=call.dtype,
        mode=call.mode,
        hashing=call.hashing,
        backward=call.backward,
        causal=call.causal,
        normalize=prep.normalize,
        key_padding_mask=prep.key_mask is not None,
        query_mask=prep.query_mask is not None,
        requires_grad=call.requires_grad,
    )
    return values, shown


_ORDER = tuple(name for name in RANK_FIELDS if name != "planes") + ("planes0", "planes1", "n_query", "n_key")
_SHOWN = tuple(name for name in RANK_FIELDS if name != "planes")


_NAMES = {"dtype": FLOAT_DTYPES, "mode": MODES, "hashing": HASHINGS, "backward": BACKWARDS}
_FLAGS = ("causal", "normalize", "key_padding_mask", "query_mask", "requires_grad")


def _shown(name: str, value: float):
    """Another rank's field as its error message shows it (the exchanged numbers decoded)."""
    if name in _NAMES:
        return _NAMES[name][int(value)]
    if name in _FLAGS:
        return bool(value)
    if name == "lead":
        return f"other dims (checksum {int(value)})"
    return int(value)


def exchange_layouts(comm: TorchCollectives, prep) -> list[dict]:
    """Every rank's layout (one all-gather of float64 numbers: exact for integers below 2**53), checked."""
    values, shown = _layout(prep)
    flat = dict(values, planes0=values["planes"][0], planes1=values["planes"][1])
    mine = torch.tensor([float(flat[name]) for name in _ORDER], dtype=torch.float64, device=comm.device)
    gathered = [torch.empty_like(mine) for _ in range(comm.size)]
    dist.all_gather(gathered, mine, group=comm.group)
    rows = []
    for t in gathered:
        row = dict(zip(_ORDER, t.tolist()))
        row["planes"] = (row.pop("planes0"), row.pop("planes1"))
        rows.append(row)
    described = {
        name: [shown[name] if r == comm.rank else _shown(name, row[name]) for r, row in enumerate(rows)]
        for name in _SHOWN
    }
    described["planes"] = [row["planes"] for row in rows]
    check_ranks_agree(rows, described=described)
    return rows


# ---- autograd ---------------------------------------------------------------------------------------


@dataclass
class _Run:
    backend: object
    comm: TorchCollectives
    plan: sp.Plan


class _Core(torch.autograd.Function):
    """YOSO between the normalisations for this rank's slice; the backward communicates too."""

    @staticmethod
    def forward(ctx, q, k, v, planes, query_mask, key_mask, run: _Run):
        args = tuple(glue.to_backend(run.backend, t) for t in (q, k, v, planes, query_mask, key_mask))
        y, codes = run.plan.run_forward(run.backend, run.comm, *args)
        # The backend's own arrays (and the codes) are kept as they are: no conversion in the backward.
        ctx.run, ctx.args, ctx.codes = run, args, codes
        ctx.like = tuple((t.dtype, t.device) for t in (q, k, v))
        return glue.from_backend(y, q, glue.accumulate_dtype(q.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        run = ctx.run
        q, k, v, planes, query_mask, key_mask = ctx.args
        grad = glue.to_backend(run.backend, grad.contiguous())
        grads = run.plan.run_backward(run.backend, run.comm, q, k, v, planes, ctx.codes, query_mask, key_mask, grad)
        out = tuple(
            glue.from_backend(g, torch.empty(0, device=device), dtype) for g, (dtype, device) in zip(grads, ctx.like)
        )
        return out + (None,) * 4


@torch.compiler.disable  # collectives and NumPy/JAX arrays: eager (a graph break under torch.compile)
def attention(backend, prep):
    """``yoso.attention(..., group=...)`` of a prepared call on ``backend``: this rank's output slice."""
    call = prep.call
    comm = TorchCollectives(
        prep.parallel.group, framework=backend.framework, device=_device_for(prep.parallel.group, prep.q)
    )
    rows = exchange_layouts(comm, prep)
    comm.lengths = tuple(int(row["n_key"]) for row in rows)
    itemsize = torch.empty(0, dtype=glue.accumulate_dtype(prep.q.dtype)).element_size()
    run = _Run(backend, comm, sp.plan(call, comm, itemsize=itemsize, key_mask=prep.key_mask is not None))
    q = glue.keep_rows(prep.q, prep.query_mask)
    k = glue.keep_rows(prep.k, prep.key_mask)
    v = glue.keep_rows(prep.v, prep.key_mask)
    unit = glue.unit
    y = _Core.apply(unit(q).to(q.dtype), unit(k).to(k.dtype), v, prep.planes, prep.query_mask, prep.key_mask, run)
    out = unit(y) if prep.normalize else y
    return out.to(prep.q.dtype).reshape(prep.lead + (call.n_query, call.value_dim))
