"""Sequence parallelism, the framework-neutral half: one YOSO call over a sequence split across ranks.

Each rank holds a contiguous slice of the sequence (ranks in order) and gets its slice of the result and
of the gradients (docs/math.md#sequence-parallelism). This module composes the backend's primitives --
on the backend's own arrays, exactly as ``yoso._core`` does for one process -- with a small
:class:`Collectives` interface (sum over ranks, exclusive prefix and suffix sums over ranks, a ring
shift). The engines implement that interface and the autograd around it: ``yoso_parallel._torch``
(torch.distributed, a ``torch.autograd.Function``) and ``yoso_parallel._jax`` (``lax.psum`` /
``lax.ppermute`` inside ``jax.shard_map``, a ``jax.custom_vjp``). Both run the :class:`Plan` that
:func:`plan` makes of a prepared call.

What moves between ranks, per call:

* YOSO-m forward: the bucket tables of the keys, ``B·m·2^τ·Dv`` numbers whatever N -- summed over ranks
  (non-causal) or their exclusive prefix (causal: the ranks before this one), read by the local queries,
  plus the local causal ``cumulate``.
* dV: the roles-swapped tables of the output gradients, summed or their exclusive suffix (causal).
* dq, dk (lower bound): either the tables of outer products ``A = Σ v⊗k̂`` and ``B = Σ G⊗q̂``
  (``B·m·2^τ·D·Dv`` numbers each, independent of N but large), or a ring pass of the K/V blocks as ring
  attention does (O(N·D) per rank): whichever sends fewer bytes (:func:`choose_grads`).
* ``backward="exact"`` (*YOSO) and YOSO-E need the pairs, hence every key: always the ring.
"""

from __future__ import annotations

import abc
import contextlib
import math
import threading
from dataclasses import dataclass, field

from yoso.testing import max_ratio

STRATEGIES = ("tables", "ring")

# The lower bound's tables of outer products are built, summed and read a few hashes at a time, so that
# a chunk holds at most this many bytes (the bytes sent are the same; the peak memory is bounded).
TABLE_CHUNK_BYTES = 1 << 27


# ---- collectives ---------------------------------------------------------------------------------


class Collectives(abc.ABC):
    """What the composition needs from an engine, on the backend's arrays (sums in their dtype).

    ``size`` is the number of ranks and ``lengths`` the number of key rows each holds (static: the ring
    needs the shapes of the blocks it receives, and the plan the total length). ``what`` names the
    payload for the traffic report.
    """

    size: int
    lengths: tuple[int, ...]

    @abc.abstractmethod
    def all_reduce(self, x, *, what: str):
        """The sum of ``x`` over all ranks."""

    @abc.abstractmethod
    def exclusive_prefix(self, x, *, what: str):
        """The sum of ``x`` over the ranks before this one (zeros on the first)."""

    @abc.abstractmethod
    def exclusive_suffix(self, x, *, what: str):
        """The sum of ``x`` over the ranks after this one (zeros on the last)."""

    @abc.abstractmethod
    def ring_shift(self, arrays: tuple, *, hops: int, what: str) -> tuple:
        """Send ``arrays`` to the next rank, receive the previous rank's (a ring).

        The arrays are key-aligned (axis 1 runs over the key rows of the block). After the shift this rank
        holds the block that started ``hops`` ranks before it (modulo ``size``).
        """

    @abc.abstractmethod
    def earlier(self, hops: int):
        """Whether the block that started ``hops`` ranks before this one comes before it in the sequence
        (no wrap-around): a Python bool where the rank is known, else a traced bool."""

    @abc.abstractmethod
    def concatenate(self, arrays: list):
        """The backend's arrays joined along axis 1 (tokens): the one array operation the composition
        needs besides the primitives (reading tables of outer products a block of tokens at a time)."""

    @abc.abstractmethod
    def scan_bytes(self, op: str, nbytes: int, rank: int | None) -> float:
        """Bytes one rank sends for an exclusive prefix or suffix sum by the engine's algorithm (``size > 1``)."""

    def sent_bytes(self, op: str, nbytes: int, rank: int | None = None) -> float:
        """Bytes one rank sends for ``op`` on a payload of ``nbytes`` (``rank`` None: the mean over ranks):
        the model the plan and the traffic report use. All-reduces are ring all-reduces (reduce-scatter +
        all-gather; NCCL's and gloo's for large buffers: ``2 (R - 1) / R`` of the payload); a ring shift
        sends its payload."""
        if self.size == 1:
            return 0.0
        if op == "all_reduce":
            return 2.0 * (self.size - 1) / self.size * nbytes
        if op in ("exclusive_prefix", "exclusive_suffix"):
            return self.scan_bytes(op, nbytes, rank)
        return float(nbytes)


def chain_bytes(size: int, op: str, nbytes: int, rank: int | None) -> float:
    """Prefix and suffix sums as a chain, torch's algorithm: each rank but the last (the first for the
    suffix) sends one table."""
    if rank is None:
        return nbytes * (size - 1) / size
    end = size - 1 if op == "exclusive_prefix" else 0
    return 0.0 if rank == end else float(nbytes)


# ---- the traffic report (a counting wrapper) -----------------------------------------------------


@dataclass
class Transfer:
    phase: str  # "forward" or "backward"
    op: str  # all_reduce, exclusive_prefix, exclusive_suffix, ring_shift
    what: str
    payload: int  # bytes handed to the collective on this rank
    sent: float  # bytes this rank sends, by the engine's algorithm (Collectives.sent_bytes)


@dataclass
class Traffic:
    """The collectives one rank ran while :func:`recording` was active (JAX: while tracing)."""

    transfers: list[Transfer] = field(default_factory=list)

    def sent(self, phase: str | None = None) -> float:
        return sum(t.sent for t in self.transfers if phase is None or t.phase == phase)

    def payload(self, phase: str | None = None) -> int:
        return sum(t.payload for t in self.transfers if phase is None or t.phase == phase)

    def summary(self) -> dict:
        rows: dict[tuple[str, str, str], list] = {}
        for t in self.transfers:
            row = rows.setdefault((t.phase, t.op, t.what), [0, 0, 0.0])
            row[0] += 1
            row[1] += t.payload
            row[2] += t.sent
        return {
            "forward_sent_bytes": self.sent("forward"),
            "backward_sent_bytes": self.sent("backward"),
            "transfers": [
                {"phase": p, "op": o, "what": w, "count": c, "payload_bytes": b, "sent_bytes": s}
                for (p, o, w), (c, b, s) in rows.items()
            ],
        }


_recording: list[Traffic] = []
_recording_lock = threading.Lock()


@contextlib.contextmanager
def recording():
    """Record the collectives of sequence-parallel calls made inside the block (all threads: torch may
    run a backward on another thread). Yields a :class:`Traffic`."""
    traffic = Traffic()
    with _recording_lock:
        _recording.append(traffic)
    try:
        yield traffic
    finally:
        with _recording_lock:
            _recording.remove(traffic)


class Counting(Collectives):
    """A :class:`Collectives` that records every call into the active :class:`Traffic` records."""

    def __init__(self, inner: Collectives, phase: str, records: list[Traffic]):
        self.inner, self.phase, self.records = inner, phase, records
        self.size, self.lengths = inner.size, inner.lengths

    def _record(self, op: str, what: str, arrays) -> None:
        payload = sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays if a is not None)
        rank = getattr(self.inner, "rank", None)
        rank = rank if isinstance(rank, int) else None
        transfer = Transfer(self.phase, op, what, payload, self.inner.sent_bytes(op, payload, rank))
        for traffic in self.records:
            traffic.transfers.append(transfer)

    def all_reduce(self, x, *, what):
        self._record("all_reduce", what, (x,))
        return self.inner.all_reduce(x, what=what)

    def exclusive_prefix(self, x, *, what):
        self._record("exclusive_prefix", what, (x,))
        return self.inner.exclusive_prefix(x, what=what)

    def exclusive_suffix(self, x, *, what):
        self._record("exclusive_suffix", what, (x,))
        return self.inner.exclusive_suffix(x, what=what)

    def ring_shift(self, arrays, *, hops, what):
        self._record("ring_shift", what, arrays)
        return self.inner.ring_shift(arrays, hops=hops, what=what)

    def earlier(self, hops):
        return self.inner.earlier(hops)

    def concatenate(self, arrays):
        return self.inner.concatenate(arrays)

    def scan_bytes(self, op, nbytes, rank):
        return self.inner.scan_bytes(op, nbytes, rank)


def _counted(comm: Collectives, phase: str) -> Collectives:
    with _recording_lock:
        records = list(_recording)
    return Counting(comm, phase, records) if records else comm


# ---- choosing how dq, dk cross ranks ---------------------------------------------------------------

_forced = threading.local()


@contextlib.contextmanager
def force_grads(strategy: str | None):
    """Force how the lower bound's dq, dk cross ranks ("tables" or "ring"; None: by bytes) -- for tests
    and benchmarks. ``backward="exact"`` and YOSO-E always use the ring."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
    previous = getattr(_forced, "grads", None)
    _forced.grads = strategy
    try:
        yield
    finally:
        _forced.grads = previous


@dataclass(frozen=True)
class Sizes:
    """What the plan needs to know about a call (the same on every rank)."""

    batch: int
    dim: int
    value_dim: int
    num_hashes: int
    hash_bits: int
    itemsize: int  # of the accumulation dtype
    causal: bool
    key_mask: bool


def grads_bytes(comm: Collectives, sizes: Sizes) -> dict[str, float]:
    """Bytes a rank sends, on average over ranks, for the lower bound's dq, dk by each strategy."""
    s = sizes
    table = s.batch * s.num_hashes * (1 << s.hash_bits) * s.dim * s.value_dim * s.itemsize
    ops = ("exclusive_prefix", "exclusive_suffix") if s.causal else ("all_reduce", "all_reduce")
    tables = sum(comm.sent_bytes(op, table) for op in ops)
    # The ring: every block travels size - 1 hops with its keys, values (and mask) and the dk accumulator,
    # and the accumulator makes one more hop home.
    per_row = (s.dim + s.value_dim + s.dim) * s.itemsize + (1 if s.key_mask else 0)
    rows = sum(comm.lengths) * s.batch
    ring = rows * ((comm.size - 1) * per_row + s.dim * s.itemsize) / comm.size if comm.size > 1 else 0.0
    return {"tables": tables, "ring": ring}


def choose_grads(comm: Collectives, sizes: Sizes, *, mode: str, backward: str) -> str:
    """How the sampled lower bound's dq, dk cross ranks: the strategy that sends fewer bytes (ties and
    a single rank: the tables, which need no second pass). The exact estimators need the ring."""
    if mode == "expectation" or backward == "exact":
        return "ring"
    forced = getattr(_forced, "grads", None)
    if forced is not None:
        return forced
    sent = grads_bytes(comm, sizes)
    return "ring" if sent["ring"] < sent["tables"] else "tables"


@dataclass(frozen=True)
class Plan:
    """The options of one split call, the same on every rank (hashable: JAX compiles one program per plan)."""

    mode: str
    hashing: str
    num_hashes: int
    hash_bits: int
    causal: bool
    backward: str
    grads: str  # how the lower bound's dq, dk cross ranks (choose_grads)

    def run_forward(self, backend, comm, q, k, v, planes, query_mask, key_mask):
        """:func:`forward` with this plan's options."""
        options = dict(hashing=self.hashing, num_hashes=self.num_hashes, hash_bits=self.hash_bits)
        return forward(
            backend, comm, q, k, v, planes, query_mask, key_mask, mode=self.mode, causal=self.causal, **options
        )

    def run_backward(self, backend, comm, q, k, v, planes, codes, query_mask, key_mask, grad):
        """:func:`backward` with this plan's options."""
        options = dict(hashing=self.hashing, num_hashes=self.num_hashes, hash_bits=self.hash_bits)
        return backward(
            backend,
            comm,
            q,
            k,
            v,
            planes,
            codes,
            query_mask,
            key_mask,
            grad,
            mode=self.mode,
            backward=self.backward,
            causal=self.causal,
            grads=self.grads,
            **options,
        )


def plan(call, comm: Collectives, *, itemsize: int, key_mask: bool) -> Plan:
    """The plan of a prepared call (its ``yoso.backends.Call``) whose sums are ``itemsize``-byte numbers."""
    sizes = Sizes(
        batch=call.batch,
        dim=call.dim,
        value_dim=call.value_dim,
        num_hashes=call.num_hashes,
        hash_bits=call.hash_bits,
        itemsize=itemsize,
        causal=call.causal,
        key_mask=key_mask,
    )
    return Plan(
        mode=call.mode,
        hashing=call.hashing,
        num_hashes=call.num_hashes,
        hash_bits=call.hash_bits,
        causal=call.causal,
        backward=call.backward,
        grads=choose_grads(comm, sizes, mode=call.mode, backward=call.backward),
    )


# ---- the composition --------------------------------------------------------------------------------


def _add(total, part, weight):
    """``total + part`` where the part counts (``weight`` True or a traced bool: it multiplies)."""
    return total + part if weight is True else total + part * weight


def _visible(comm: Collectives, hops: int, causal: bool):
    return True if not causal else comm.earlier(hops)


def forward(backend, comm, q, k, v, planes, query_mask, key_mask, *, mode, hashing, num_hashes, hash_bits, causal):
    """``(Y, codes)`` of this rank's queries against the whole sequence's keys (before normalisation)."""
    comm = _counted(comm, "forward")
    if mode == "expectation":
        return _expectation_forward(backend, comm, q, k, v, query_mask, key_mask, hash_bits=hash_bits, causal=causal)
    q_codes = backend.hash_codes(q, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
    k_codes = backend.hash_codes(k, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
    tables = backend.bucket_tables(k_codes, v, mask=key_mask, hash_bits=hash_bits)
    if not causal:
        y = backend.read_buckets(q_codes, comm.all_reduce(tables, what="value tables"), mask=query_mask)
        return y, (q_codes, k_codes)
    earlier = comm.exclusive_prefix(tables, what="value tables")
    local = backend.cumulate(
        q_codes, k_codes, v, read_mask=query_mask, write_mask=key_mask, order="causal", hash_bits=hash_bits
    )
    return local + backend.read_buckets(q_codes, earlier, mask=query_mask), (q_codes, k_codes)


def backward(
    backend,
    comm,
    q,
    k,
    v,
    planes,
    codes,
    query_mask,
    key_mask,
    grad,
    *,
    mode,
    backward,
    hashing,
    num_hashes,
    hash_bits,
    causal,
    grads: str,
):
    """``(dq, dk, dv)`` of this rank's rows for the output gradient ``grad`` of :func:`forward`
    (w.r.t. unit q and k); ``grads`` is :func:`choose_grads`'s choice."""
    comm = _counted(comm, "backward")
    clamp = max_ratio(hash_bits)
    if mode == "expectation":
        return _expectation_backward(
            backend, comm, q, k, v, grad, query_mask, key_mask, hash_bits=hash_bits, causal=causal, backward=backward
        )
    q_codes, k_codes = codes
    # dV: the output gradients' tables, read by the keys (causally: from queries at positions >= theirs).
    g_tables = backend.bucket_tables(q_codes, grad, mask=query_mask, hash_bits=hash_bits)
    if not causal:
        dv = backend.read_buckets(k_codes, comm.all_reduce(g_tables, what="gradient tables"), mask=key_mask)
    else:
        later = comm.exclusive_suffix(g_tables, what="gradient tables")
        dv = backend.cumulate(
            k_codes, q_codes, grad, read_mask=key_mask, write_mask=query_mask, order="anticausal", hash_bits=hash_bits
        ) + backend.read_buckets(k_codes, later, mask=key_mask)
    options = dict(hash_bits=hash_bits, backward=backward, max_ratio=clamp)
    if grads == "tables":
        dq, dk = _lower_bound_tables(
            backend, comm, q_codes, k_codes, q, k, v, grad, query_mask, key_mask, hash_bits=hash_bits, causal=causal
        )
        if causal:  # the pairs within this rank, in causal order
            dq_local, dk_local = backend.sampled_grads(
                q_codes, k_codes, q, k, v, grad, query_mask=query_mask, key_mask=key_mask, causal=True, **options
            )
            dq, dk = dq + dq_local, dk + dk_local
        return dq, dk, dv
    dq, dk = backend.sampled_grads(
        q_codes, k_codes, q, k, v, grad, query_mask=query_mask, key_mask=key_mask, causal=causal, **options
    )
    hash_options = dict(hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)

    def pairs(block, weight, dq, accumulators):
        k_block, v_block, mask_block = block
        block_codes = backend.hash_codes(k_block, planes, **hash_options)  # the same codes its owner computed
        dq_part, dk_part = backend.sampled_grads(
            q_codes,
            block_codes,
            q,
            k_block,
            v_block,
            grad,
            query_mask=query_mask,
            key_mask=mask_block,
            causal=False,
            **options,
        )
        (dk_acc,) = accumulators
        return _add(dq, dq_part, weight), (_add(dk_acc, dk_part, weight),)

    dq, (dk,) = _ring(comm, k, v, key_mask, dq, (dk,), pairs, causal=causal, what=("keys", "dk"))
    return dq, dk, dv


def _ring(comm, k, v, key_mask, dq, accumulators, pairs, *, causal, what):
    """Ring attention's pass: the (k, v, mask) blocks go round the ring with accumulators for their
    gradients; each rank adds what its queries owe every visible block, and the accumulators come home."""
    if comm.size == 1:
        return dq, accumulators
    block = (k, v) if key_mask is None else (k, v, key_mask)
    for hops in range(1, comm.size):
        moved = comm.ring_shift(block + accumulators, hops=hops, what=f"{what[0]} and {what[1]}")
        block, accumulators = moved[: len(block)], moved[len(block) :]
        weight = _visible(comm, hops, causal)
        if weight is False:
            continue  # a later block: nothing to add, only to pass on
        dq, accumulators = pairs(block if key_mask is not None else block + (None,), weight, dq, accumulators)
    return dq, comm.ring_shift(accumulators, hops=comm.size, what=what[1])


def _lower_bound_tables(backend, comm, q_codes, k_codes, q, k, v, grad, query_mask, key_mask, *, hash_bits, causal):
    """The lower bound's dq, dk through the tables of outer products (docs/math.md#lower-bound) summed
    over ranks -- causally only the other ranks' (prefix for dq, suffix for dk; the caller adds the
    local pairs). ``TABLE_CHUNK_BYTES`` bounds the memory: the tables are built, summed and read a few
    hashes at a time, and each token's ``D·Dv`` outer product is formed a block of tokens at a time."""
    batch, num_hashes = q_codes.shape[0], q_codes.shape[1]
    dim, value_dim = q.shape[2], v.shape[2]
    per_hash = batch * (1 << hash_bits) * dim * value_dim * grad.dtype.itemsize
    chunk = max(1, min(num_hashes, TABLE_CHUNK_BYTES // per_hash))
    rows = max(1, TABLE_CHUNK_BYTES // (batch * dim * value_dim * grad.dtype.itemsize))
    dq = dk = None
    for start in range(0, num_hashes, chunk):
        stop = min(num_hashes, start + chunk)
        qc, kc = q_codes[:, start:stop], k_codes[:, start:stop]
        a = _outer_tables(backend, kc, v, k, key_mask, hash_bits=hash_bits, rows=rows)  # Σ v ⊗ k̂
        b = _outer_tables(backend, qc, grad, q, query_mask, hash_bits=hash_bits, rows=rows)  # Σ G ⊗ q̂
        if causal:
            a = comm.exclusive_prefix(a, what="lower-bound tables")
            b = comm.exclusive_suffix(b, what="lower-bound tables")
        else:
            a = comm.all_reduce(a, what="lower-bound tables")
            b = comm.all_reduce(b, what="lower-bound tables")
        # read_buckets averages over the chunk's hashes; the estimator averages over all of them.
        scale = 0.5 * hash_bits * (stop - start) / num_hashes
        dq_part = scale * _read_outer(backend, comm, qc, a, query_mask, grad, rows=rows)
        dk_part = scale * _read_outer(backend, comm, kc, b, key_mask, v, rows=rows)
        dq = dq_part if dq is None else dq + dq_part
        dk = dk_part if dk is None else dk + dk_part
    return dq, dk


def _outer_tables(backend, codes, values, outer, mask, *, hash_bits, rows):
    """``bucket_tables(codes, values, outer=outer)``, summed over blocks of ``rows`` tokens (tables add)."""
    n = codes.shape[2]
    total = None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        part = backend.bucket_tables(
            codes[:, :, start:stop],
            values[:, start:stop],
            mask=None if mask is None else mask[:, start:stop],
            hash_bits=hash_bits,
            outer=outer[:, start:stop],
        )
        total = part if total is None else total + part
    return total


def _read_outer(backend, comm, codes, tables, mask, weights, *, rows):
    """``read_buckets(codes, tables, weights=weights)`` a block of ``rows`` tokens at a time, joined."""
    n = codes.shape[2]
    parts = [
        backend.read_buckets(
            codes[:, :, start : min(n, start + rows)],
            tables,
            mask=None if mask is None else mask[:, start : min(n, start + rows)],
            weights=weights[:, start : min(n, start + rows)],
        )
        for start in range(0, n, rows)
    ]
    return parts[0] if len(parts) == 1 else comm.concatenate(parts)


def _expectation_forward(backend, comm, q, k, v, query_mask, key_mask, *, hash_bits, causal):
    y = backend.expectation_forward(
        q, k, v, query_mask=query_mask, key_mask=key_mask, causal=causal, hash_bits=hash_bits
    )
    if comm.size == 1:
        return y, None
    block = (k, v) if key_mask is None else (k, v, key_mask)
    for hops in range(1, comm.size):
        block = comm.ring_shift(block, hops=hops, what="keys")
        weight = _visible(comm, hops, causal)
        if weight is False:
            continue
        k_block, v_block, mask_block = block if key_mask is not None else block + (None,)
        part = backend.expectation_forward(
            q, k_block, v_block, query_mask=query_mask, key_mask=mask_block, causal=False, hash_bits=hash_bits
        )
        y = _add(y, part, weight)
    return y, None


def _expectation_backward(backend, comm, q, k, v, grad, query_mask, key_mask, *, hash_bits, causal, backward):
    options = dict(hash_bits=hash_bits, backward=backward, max_ratio=max_ratio(hash_bits))
    dq, dk, dv = backend.expectation_backward(
        q, k, v, grad, query_mask=query_mask, key_mask=key_mask, causal=causal, **options
    )

    def pairs(block, weight, dq, accumulators):
        k_block, v_block, mask_block = block
        dq_part, dk_part, dv_part = backend.expectation_backward(
            q, k_block, v_block, grad, query_mask=query_mask, key_mask=mask_block, causal=False, **options
        )
        dk_acc, dv_acc = accumulators
        return _add(dq, dq_part, weight), (_add(dk_acc, dk_part, weight), _add(dv_acc, dv_part, weight))

    dq, (dk, dv) = _ring(comm, k, v, key_mask, dq, (dk, dv), pairs, causal=causal, what=("keys", "dk, dv"))
    return dq, dk, dv


# ---- the communication model (for yoso bench and the docs) -----------------------------------------


def model(
    *,
    size: int,
    n: int,
    batch: int,
    dim: int,
    value_dim: int,
    num_hashes: int,
    hash_bits: int,
    itemsize: int = 4,
    causal: bool = False,
    key_mask: bool = False,
) -> dict:
    """Bytes one rank sends per call (mean over ranks) for a sequence of ``n`` rows split evenly over
    ``size`` ranks, under torch.distributed's algorithms (ring all-reduce, chained prefix sums):
    YOSO's forward and backward by each strategy, ring attention's (K/V blocks round the ring; dK/dV
    accumulators home in the backward), and the crossover lengths."""
    comm = _ModelCollectives(size, n)
    sizes = Sizes(batch, dim, value_dim, num_hashes, hash_bits, itemsize, causal, key_mask)
    table = batch * num_hashes * (1 << hash_bits) * value_dim * itemsize
    op = "exclusive_prefix" if causal else "all_reduce"
    forward = comm.sent_bytes(op, table)
    dv = comm.sent_bytes("exclusive_suffix" if causal else "all_reduce", table)
    grads = grads_bytes(comm, sizes)
    mask = 1 if key_mask else 0
    ring_forward = n * batch * (size - 1) * ((dim + value_dim) * itemsize + mask) / size
    ring_backward = ring_forward + n * batch * size * (dim + value_dim) * itemsize / size
    per_n = {
        "yoso_ring_grads": grads["ring"] / n if n else 0.0,
        "ring_forward": ring_forward / n if n else 0.0,
    }
    return {
        "forward": forward,
        "backward_tables": dv + grads["tables"],
        "backward_ring": dv + grads["ring"],
        "backward": dv + min(grads.values()),
        "grads": "ring" if grads["ring"] < grads["tables"] else "tables",
        "ring_attention_forward": ring_forward,
        "ring_attention_backward": ring_backward,
        # Lengths beyond which a ring would send more than the tables.
        "crossover_forward": forward / per_n["ring_forward"] if per_n["ring_forward"] else math.inf,
        "crossover_grads": grads["tables"] / per_n["yoso_ring_grads"] if per_n["yoso_ring_grads"] else math.inf,
    }


class _ModelCollectives(Collectives):
    """torch.distributed's algorithms as the torch adapter runs them, without communicating."""

    def __init__(self, size: int, n: int):
        self.size = size
        self.lengths = tuple(n // size + (1 if r < n % size else 0) for r in range(size))

    def scan_bytes(self, op, nbytes, rank):
        return chain_bytes(self.size, op, nbytes, rank)

    def all_reduce(self, x, *, what):  # pragma: no cover - a model only
        raise NotImplementedError

    exclusive_prefix = exclusive_suffix = all_reduce

    def ring_shift(self, arrays, *, hops, what):  # pragma: no cover
        raise NotImplementedError

    def earlier(self, hops):  # pragma: no cover
        raise NotImplementedError

    concatenate = earlier
