"""The primitives of the ``triton`` backend: block sizes, bucket sorting and kernel launches.

The functions named like the primitives of ``yoso.backends.Backend`` are the backend's primitives
(``TritonBackend.module``) and take exactly their arguments. Those arrive checked: the API has
validated shapes, dtypes, devices and ranges (``yoso._validate.prepare``) and
``TritonBackend.unsupported`` has accepted the call (head dims, bucket-table memory, index and grid
limits), so nothing here re-checks them. Inputs may be strided views: the kernels take strides.

The sampled lower-bound gradient comes in two forms (docs/math.md#lower-bound), chosen per bucket by
``sampled_grads``: pair by pair (``kernels/pairs.py``) or through per-bucket tables (``kernels/tables.py``).
The bucket tables as arrays (``bucket_tables``, ``read_buckets``, ``add_to_tables``: a carried state, a split
sequence; docs/math.md#bucket-tables) are ``kernels/state.py``.

Bucket sorting (the index work behind the cumulation and the sampled gradients) is a Triton counting
sort (``kernels/sorting.py``); for very many buckets (large 2**tau) torch's radix sort on int64 keys
``(b * 2**tau + code) * N + position`` takes over (see ``SORT``).
"""

from __future__ import annotations

import math

import torch
import triton

from . import backend, kernels
from .backend import MAX_GRID_YZ, table_bytes
from .kernels import INTERPRET

# The backend chose its devices from TRITON_INTERPRET when yoso loaded it; Triton chose between the
# compiler and the interpreter just now, when the kernels were imported. If the variable changed in
# between, CPU tensors would reach compiled GPU kernels (or CUDA tensors the interpreter): refuse.
if bool(INTERPRET) != backend.INTERPRET:
    raise RuntimeError("TRITON_INTERPRET changed after yoso_triton was loaded; set it before the first yoso call")

GROUP_BYTES = 256 << 20  # scratch a hash group aims for

# Block sizes: the interpreter pays per operation, not per element, so it gets few large tiles; a GPU
# gets tiles sized for registers and shared memory. Tests switch this off to run the GPU tiling
# (chunk carries, one bucket per program, D loops) through the interpreter.
INTERPRETER_BLOCKS = INTERPRET


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(1, int(n))))


def _hash_group(num_hashes: int, per_hash_bytes: int) -> int:
    """Hashes per launch: about GROUP_BYTES of scratch, and no more than grid dim y allows."""
    return max(1, min(num_hashes, MAX_GRID_YZ, GROUP_BYTES // max(1, per_hash_bytes)))


def _mask_arg(mask, like):
    """A bool mask as a uint8 view (Triton loads bytes), with its strides; a dummy when None."""
    if mask is None:
        return like, 0, 0, False
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def _unit_stride(codes: torch.Tensor) -> torch.Tensor:
    """Codes (int32) with unit stride along N (the kernels index tokens directly)."""
    return codes if codes.stride(-1) == 1 else codes.contiguous()


# ---- hashing --------------------------------------------------------------------------------------


def hash_codes(x, planes, *, hashing: str, num_hashes: int, hash_bits: int) -> torch.Tensor:
    batch, n, _ = x.shape
    codes = torch.empty((batch, num_hashes, n), dtype=torch.int32, device=x.device)
    (_gaussian if hashing == "gaussian" else _hadamard)(x, planes, codes, num_hashes, hash_bits)
    return codes


def _gaussian(x, planes, codes, m, tau):
    batch, n, dim = x.shape
    groups = planes.shape[0]
    flat = planes.reshape(groups, m * tau, dim).to(torch.float32).contiguous()
    # Many short rows with their own planes: per-token planes (a token tile would span several sets).
    gather = groups > 1 and n < 16
    split = x.dtype != torch.float32 and not gather
    hi = flat.to(x.dtype) if split else flat
    lo = (flat - hi.float()).to(x.dtype) if split else flat
    # Hashes per program: HB * tau ~ 256 projection columns (fewer if there are fewer hashes).
    hb = min(max(16, 1 << int(math.log2(max(1, 256 // tau)))), _pow2(m))
    c = triton.next_power_of_2(hb * tau)
    if gather:
        bt, kd = (256 if INTERPRETER_BLOCKS else 16), _pow2(dim, 1) if dim < 16 else 16
        grid = (triton.cdiv(batch * n, bt), triton.cdiv(m, hb))
        per_group = batch * n
    else:
        per_group = n if groups > 1 else batch * n
        bt = min(_pow2(per_group), 1024 if INTERPRETER_BLOCKS else 64)
        kd = min(_pow2(dim), 256 if INTERPRETER_BLOCKS else 32)
        grid = (groups * triton.cdiv(per_group, bt), triton.cdiv(m, hb))
    kernels.gaussian_codes_kernel[grid](
        x,
        hi,
        lo,
        codes,
        batch * n,
        per_group,
        n,
        dim,
        m,
        *x.stride(),
        m * tau * dim if groups > 1 else 0,
        codes.stride(0),
        codes.stride(1),
        TAU=tau,
        HB=hb,
        C=c,
        BT=bt,
        KD=kd,
        SPLIT=split,
        GATHER=gather,
    )


def _hadamard(x, planes, codes, m, tau):
    batch, n, dim = x.shape
    groups, rotations, _, d_pad = planes.shape
    per = d_pad // tau  # hashes per rotation
    diag = planes.to(torch.float32).contiguous()
    rows = batch * n * rotations
    bt = min(_pow2(rows), 2048 if INTERPRETER_BLOCKS else 32)
    kernels.hadamard_codes_kernel[(triton.cdiv(rows, bt),)](
        x,
        diag,
        codes,
        rows,
        n,
        dim,
        m,
        rotations,
        per,
        *x.stride(),
        rotations * 3 * d_pad if groups > 1 else 0,
        codes.stride(0),
        codes.stride(1),
        TAU=tau,
        D_PAD=d_pad,
        DP=max(16, d_pad),
        LOG_D=int(math.log2(d_pad)),
        JP=_pow2(per),
        BT=bt,
    )


# ---- bucket sorting -------------------------------------------------------------------------------


# Which sort forms the buckets: "counting" (the Triton kernels of kernels/sorting.py), "radix" (torch's
# sort on int64 keys), or "auto": counting while the per-block histograms stay small (2**tau bins per
# block of tokens), radix for very many buckets.
SORT = "auto"


def _sort_block() -> int:
    return 1024 if INTERPRETER_BLOCKS else 128


def counting_sort(hash_bits: int) -> bool:
    if SORT != "auto":
        return SORT == "counting"
    return (1 << hash_bits) <= 8 * _sort_block()


class Sorted:
    """Tokens of one hash group sorted by (bucket, position): the index arrays the kernels read.

    ``perm [g, B*N]`` (flat token ``b * N + n`` in sorted order), ``bucket [g, B*N]`` (their bucket
    ids ``b * 2**tau + code``) and ``start [g, B * 2**tau + 1]`` (each bucket's first sorted index).
    ``reverse`` sorts positions in reverse sequence order (the anticausal prefix sums run from the end).
    """

    def __init__(self, codes, hashes: slice, hash_bits: int, reverse: bool = False):
        self.codes, self.hashes, self.hash_bits, self.reverse = codes, hashes, hash_bits, reverse
        self.batch, _, self.n = codes.shape
        self.g = hashes.stop - hashes.start
        self.n_buckets = self.batch << hash_bits
        self.counting = counting_sort(hash_bits)
        if self.counting:
            self._count()
        else:
            self._radix()

    def _count(self):
        batch, n, g, bins = self.batch, self.n, self.g, 1 << self.hash_bits
        block = _sort_block()
        if n >= block:  # long rows: blocks of one row
            self.rows_per_block, self.row_pad, self.n_blocks = 1, block, triton.cdiv(n, block)
        else:  # short rows: several whole rows per block (few programs), histograms of <= 8 * block bins
            self.row_pad = _pow2(n, 1)
            self.rows_per_block = max(1, min(block // self.row_pad, (8 * block) >> self.hash_bits))
            self.n_blocks = 1
        device = self.codes.device
        hist = torch.empty((g, batch, bins, self.n_blocks), dtype=torch.int32, device=device)
        common = (n, batch, self.n_blocks, self.hashes.start, self.codes.stride(0), self.codes.stride(1))
        kernels.bucket_histogram_kernel[self._grid()](self.codes, hist, *common, **self._meta())
        flat = hist.view(g, -1)
        self.offsets = torch.cumsum(flat, dim=1, dtype=torch.int32) - flat  # exclusive: where each block's run goes
        firsts = self.offsets.view(g, self.n_buckets, self.n_blocks)[:, :, 0]
        total = torch.full((g, 1), batch * n, dtype=torch.int32, device=device)
        self.start = torch.cat([firsts, total], dim=1).contiguous()
        self.perm = torch.empty((g, batch * n), dtype=torch.int32, device=device)
        self.bucket = torch.empty_like(self.perm)
        kernels.bucket_scatter_kernel[self._grid()](
            self.codes, self.offsets, self.perm, self.bucket, *common, **self._meta()
        )

    def _grid(self):
        return (triton.cdiv(self.batch, self.rows_per_block) * self.n_blocks, self.g)

    def _meta(self):
        return dict(
            TAU=self.hash_bits,
            BN=self.rows_per_block * self.row_pad,
            RB=self.rows_per_block,
            NP=self.row_pad,
            REVERSE=self.reverse,
        )

    def _bucket_ids(self, codes):
        bucket = codes[:, self.hashes].permute(1, 0, 2).to(torch.int64)  # [g, B, N]
        rows = torch.arange(self.batch, device=codes.device, dtype=torch.int64) << self.hash_bits
        return bucket + rows[None, :, None]

    def _positions(self, n):
        position = torch.arange(n, device=self.codes.device, dtype=torch.int64)
        return self.n - 1 - position if self.reverse else position

    def _radix(self):
        keys = (self._bucket_ids(self.codes) * self.n + self._positions(self.n)).reshape(self.g, -1)
        self.keys, perm = torch.sort(keys, dim=-1)
        self.perm = perm.to(torch.int32)
        self.bucket = torch.div(self.keys, self.n, rounding_mode="floor").to(torch.int32)
        bounds = torch.arange(self.n_buckets + 1, device=keys.device, dtype=torch.int64) * self.n
        self.start = torch.searchsorted(self.keys, bounds.expand(self.g, -1).contiguous()).to(torch.int32)

    def last_visible(self, read_codes, order: str) -> torch.Tensor:
        """``[g, B*Nr]``: for each reader, the sorted index of the last writer of its bucket it sees
        (all of them for ``"none"``; those at or before it in the sort's sequence order otherwise), -1: none."""
        if order == "none":
            bucket = self._bucket_ids(read_codes).reshape(self.g, -1)
            start = self.start.to(torch.int64)
            end, begin = torch.gather(start, 1, bucket + 1), torch.gather(start, 1, bucket)
            return torch.where(end > begin, end - 1, -1).to(torch.int32)
        if self.counting:
            index = torch.empty((self.g, self.batch * self.n), dtype=torch.int32, device=read_codes.device)
            kernels.bucket_reader_index_kernel[self._grid()](
                read_codes,
                self.codes,
                self.offsets,
                index,
                self.n,
                self.batch,
                self.n_blocks,
                self.hashes.start,
                read_codes.stride(0),
                read_codes.stride(1),
                self.codes.stride(0),
                self.codes.stride(1),
                **self._meta(),
            )
            return index
        bucket = self._bucket_ids(read_codes)
        keys = (bucket * self.n + self._positions(read_codes.shape[2])).reshape(self.g, -1)
        idx = torch.searchsorted(self.keys, keys, right=True) - 1
        found = torch.gather(self.bucket, 1, idx.clamp(min=0)).to(torch.int64)
        return torch.where((idx >= 0) & (found == bucket.reshape(self.g, -1)), idx, -1).to(torch.int32)


# ---- cumulation -----------------------------------------------------------------------------------


def cumulate(read_codes, write_codes, values, *, read_mask, write_mask, order: str, hash_bits: int):
    batch, m, n_read = read_codes.shape
    n_write, channels = values.shape[1], values.shape[2]
    read_codes, write_codes = _unit_stride(read_codes), _unit_stride(write_codes)
    # Tables when buckets are fewer than tokens; otherwise prefix sums read at each bucket's end
    # (their size does not grow with 2**tau).
    tables = order == "none" and (1 << hash_bits) <= n_write
    rows = (batch << hash_bits) if tables else batch * n_write
    group = _hash_group(m, table_bytes(batch, hash_bits, n_write, channels, prefix=not tables))
    out = torch.empty((batch, n_read, channels), dtype=torch.float32, device=values.device)
    wmask, smb, smn, has_wmask = _mask_arg(write_mask, values)
    rmask, rmb, rmn, has_rmask = _mask_arg(read_mask, values)
    cp = _pow2(channels)
    bb, bt = (min(_pow2(batch << hash_bits), 1024), 256) if INTERPRETER_BLOCKS else (16, 64)
    br = min(_pow2(batch * n_read), 4096) if INTERPRETER_BLOCKS else 64
    for s0 in range(0, m, group):
        hashes = slice(s0, min(m, s0 + group))
        g = hashes.stop - hashes.start
        srt = Sorted(write_codes, hashes, hash_bits, reverse=order == "anticausal")
        src = torch.empty((g, rows, channels), dtype=torch.float32, device=values.device)
        kernels.bucket_sums_kernel[(triton.cdiv(srt.n_buckets, bb), g)](
            values,
            wmask,
            srt.perm,
            srt.bucket,
            srt.start,
            src,
            srt.n_buckets,
            batch * n_write,
            n_write,
            channels,
            *values.stride(),
            smb,
            smn,
            HAS_MASK=has_wmask,
            PREFIX=not tables,
            BB=bb,
            BT=bt,
            CP=cp,
        )
        index = read_codes if tables else srt.last_visible(read_codes, order)
        kernels.bucket_gather_kernel[(triton.cdiv(batch * n_read, br),)](
            src,
            read_codes,
            index,
            rmask,
            out,
            batch * n_read,
            n_read,
            channels,
            g,
            s0,
            rows,
            hash_bits,
            read_codes.stride(0),
            read_codes.stride(1),
            rmb,
            rmn,
            1.0 / m,
            FROM_CODES=tables,
            HAS_MASK=has_rmask,
            ACCUMULATE=s0 > 0,
            BR=br,
            CP=cp,
        )
    return out


# ---- the bucket tables as arrays (recurrent state, sequence parallelism) ---------------------------

# add_to_tables with up to this many tokens per row adds them straight into a copy of the tables
# (kernels/state.py: add_tokens_kernel, no sort; a one-token decoding step touches m rows). Longer
# chunks are sorted, and the copy and their sums are one pass over the tables (table sums with a base).
ADD_TOKENS = 64


def _same_dtype(values, outer):
    """Both factors of an outer product in one dtype (a tensor-core product takes one): float32 if they differ."""
    if outer is None or outer.dtype == values.dtype:
        return values, outer
    return values.float(), outer.float()


def _table_strides(tables, outer: bool):
    """The 4 (plain) or 5 (outer) strides of ``[B, m, 2**tau, C(, F)]`` tables."""
    return tuple(tables.stride()) if outer else tuple(tables.stride())[:4]


def _table_shape(codes, values, outer, hash_bits):
    batch, m, _ = codes.shape
    return (batch, m, 1 << hash_bits, values.shape[2]) + (() if outer is None else (outer.shape[2],))


def bucket_tables(codes, values, *, mask, hash_bits: int, outer=None):
    return _table_sums(codes, values, mask, hash_bits, outer, base=None)


def add_to_tables(tables, codes, values, *, mask, hash_bits: int, outer=None):
    if codes.shape[2] > ADD_TOKENS:
        return _table_sums(codes, values, mask, hash_bits, outer, base=tables)
    return _add_tokens(tables, codes, values, mask, outer)


def _sum_blocks(n_buckets, c, f, outer: bool):
    """``(BB, BT, BC, BF)`` of the table sums. The interpreter takes whole rows and many buckets per program,
    tiles of up to 2**20 elements (Triton's limit; with ``outer``: the flattened products of ``FLAT``)."""
    if not INTERPRETER_BLOCKS:
        return (1, 32, min(_pow2(c), 64), min(_pow2(f), 64)) if outer else (16, 64, min(_pow2(c), 128), 1)
    bc, bf = (_pow2(c, 4), _pow2(f, 4)) if outer else (_pow2(c), 1)  # FLAT's product needs BC * BF >= 16
    width = bc * bf
    bt = max(16, min(256, (1 << 20) // width))
    return min(_pow2(n_buckets), max(16, (1 << 20) // max(width, bt))), bt, bc, bf


def _table_sums(codes, values, mask, hash_bits, outer, base):
    """Tables of the tokens sorted by bucket (``base`` + them where given): every row written once."""
    values, outer = _same_dtype(values, outer)
    codes = _unit_stride(codes.to(torch.int32))
    batch, m, n = codes.shape
    c, f = values.shape[2], 1 if outer is None else outer.shape[2]
    dtype = torch.float32 if base is None else base.dtype
    out = torch.empty(_table_shape(codes, values, outer, hash_bits), dtype=dtype, device=values.device)
    vmask, smb, smn, has_mask = _mask_arg(mask, values)
    like = out if base is None else base  # (a dummy when there is no base)
    strides = _table_strides(like, outer is not None) + _table_strides(out, outer is not None)
    n_buckets = batch << hash_bits
    bb, bt, bc, bf = _sum_blocks(n_buckets, c, f, outer is not None)
    meta = dict(HAS_MASK=has_mask, HAS_BASE=base is not None, BB=bb, BT=bt, BC=bc)
    group = _hash_group(m, table_bytes(batch, hash_bits, n, 0))
    for s0 in range(0, m, group):
        hashes = slice(s0, min(m, s0 + group))
        srt = Sorted(codes, hashes, hash_bits)
        grid = (triton.cdiv(n_buckets, bb), hashes.stop - hashes.start)
        sort = (vmask, srt.perm, srt.bucket, srt.start, like, out, n_buckets, batch * n, n, c)
        if outer is None:
            kernels.table_sums_kernel[grid + (triton.cdiv(c, bc),)](
                values, *sort, s0, hash_bits, *values.stride(), smb, smn, *strides, **meta
            )
        else:
            f_tiles = triton.cdiv(f, bf)
            kernels.outer_table_sums_kernel[grid + (triton.cdiv(c, bc) * f_tiles,)](
                values,
                outer,
                *sort,
                f,
                s0,
                hash_bits,
                f_tiles,
                *values.stride(),
                *outer.stride(),
                smb,
                smn,
                *strides,
                FLAT=bb > 1,
                BF=bf,
                **meta,
            )
    return out


def _add_tokens(tables, codes, values, mask, outer):
    """A copy of ``tables`` with a few tokens added: only the rows of their buckets are touched."""
    values, outer = _same_dtype(values, outer)
    codes = codes.to(torch.int32)
    batch, m, n = codes.shape
    c, f = values.shape[2], 1 if outer is None else outer.shape[2]
    out = tables.clone(memory_format=torch.contiguous_format)
    vmask, smb, smn, has_mask = _mask_arg(mask, values)
    if INTERPRETER_BLOCKS:
        bn, bc, bf = 64, _pow2(c), _pow2(f)
    else:
        bn, bc, bf = 16, min(_pow2(c), 64 if outer is not None else 128), min(_pow2(f), 64)
    f_tiles = 1 if outer is None else triton.cdiv(f, bf)
    other = values if outer is None else outer
    for s0 in range(0, m, MAX_GRID_YZ):
        g = min(m, s0 + MAX_GRID_YZ) - s0
        kernels.add_tokens_kernel[(batch * n, g, triton.cdiv(c, bc) * f_tiles)](
            codes,
            values,
            other,
            vmask,
            out,
            n,
            c,
            f,
            s0,
            f_tiles,
            *codes.stride(),
            *values.stride(),
            *other.stride(),
            smb,
            smn,
            *_table_strides(out, outer is not None),
            *((0,) if outer is None else ()),
            OUTER=outer is not None,
            HAS_MASK=has_mask,
            BN=bn,
            BC=bc,
            BF=bf,
        )
    return out


def read_buckets(codes, tables, *, mask, weights=None):
    batch, m, n = codes.shape
    c = tables.shape[3]
    width = c if weights is None else tables.shape[4]
    out = torch.empty((batch, n, width), dtype=torch.float32, device=tables.device)
    rmask, rmb, rmn, has_mask = _mask_arg(mask, tables)
    strides = _table_strides(tables, weights is not None) + ((0,) if weights is None else ())
    w = tables if weights is None else weights
    if weights is None:
        br, bc, bx = (min(_pow2(batch * n), 1024), 16, _pow2(c)) if INTERPRETER_BLOCKS else (64, 16, min(_pow2(c), 128))
    elif INTERPRETER_BLOCKS:
        bc, bx = _pow2(c), _pow2(width)
        br = max(16, min(_pow2(batch * n), (1 << 18) // (bc * bx)))
    else:
        br, bc, bx = 16, 16, min(_pow2(width), 32)
    kernels.table_reads_kernel[(triton.cdiv(batch * n, br), triton.cdiv(width, bx))](
        codes,
        tables,
        w,
        rmask,
        out,
        batch * n,
        n,
        m,
        c,
        width,
        1.0 / m,
        *codes.stride(),
        *strides,
        *(w.stride() if weights is not None else (0, 0, 0)),
        rmb,
        rmn,
        WEIGHTS=weights is not None,
        HAS_MASK=has_mask,
        BR=br,
        BC=bc,
        BX=bx,
    )
    return out


# ---- sampled gradients ----------------------------------------------------------------------------


def _fixed_point_scales(bound: torch.Tensor) -> torch.Tensor:
    """Per-row power-of-two scales with ``bound * scale <= 2**61`` (int64 sums cannot overflow)."""
    exponent = torch.floor(61.0 - torch.log2(bound.double()))
    return torch.exp2(exponent.clamp(max=100.0)).to(torch.float32)


def _row_norms(x, mask):
    # float64: the bounds multiply norms, which overflow float32 for huge (finite) values and cotangents.
    norms = torch.linalg.vector_norm(x.double(), dim=-1)
    return norms if mask is None else torch.where(mask, norms, torch.zeros_like(norms))


# The forms of the lower-bound gradient (docs/math.md#lower-bound): "auto" chooses per bucket, "pairs"
# and "tables" force one form for every bucket (tests, benchmarks).
FORMS = ("auto", "pairs", "tables")

# A test hook: when set, called as ``on_plan(hashes, table)`` for each hash group, ``table`` a bool
# ``[g, B * 2**tau]`` marking the buckets that took the table form (all False: pairs only).
on_plan = None


class _Segments:
    """A sort's index arrays as the pair kernel reads them (``Sorted`` or a subset of its buckets)."""

    def __init__(self, perm, bucket, start, n_buckets):
        self.perm, self.bucket, self.start, self.n_buckets = perm, bucket, start, n_buckets


def _table_buckets(sq, sk, form, dim, dv, hash_bits, n_q, n_k):
    """``(table [g, B * 2**tau] bool, per_row)``: the buckets that take the table form, and a bound on how
    many one row of one hash can have (it sizes the launch grid without reading the flags back).

    A bucket with ``n_q`` queries and ``n_k`` keys costs ``n_q n_k (Dv + 2D)`` multiply-adds in pair form
    (the coupling G.v, then dq += C k and dk += C^T q) and ``2 (n_q + n_k) D Dv`` in table form (build and
    apply a D x Dv table, for dq and for dk); "auto" takes the cheaper. Tables win only where
    ``n_q n_k / (n_q + n_k) > c = 2 D Dv / (Dv + 2D)``, which needs more than ``c`` tokens on each
    side, so at most ``N / (floor(c) + 1)`` such buckets fit in a row. Buckets without a query or
    without a key have no pair and take no form.
    """
    nq = sq.start[:, 1:] - sq.start[:, :-1]
    nk = sk.start[:, 1:] - sk.start[:, :-1]
    if form == "tables":
        return (nq > 0) & (nk > 0), min(1 << hash_bits, n_q, n_k)
    least = (2 * dim * dv) // (dv + 2 * dim)  # floor(c)
    per_row = min(1 << hash_bits, n_q // (least + 1), n_k // (least + 1))
    fq, fk = nq.to(torch.float64), nk.to(torch.float64)  # exact: products of counts below 2**53
    cheaper = 2.0 * (fq + fk) * (dim * dv) < fq * fk * (dv + 2 * dim)
    # (nq, nk > floor(c) follows from `cheaper`; stated again so that rounding cannot break the bound.)
    return cheaper & (nq > least) & (nk > least), per_row


def _bucket_list(table, per_row, batch):
    """``[g, L]`` int32: each hash's table-form buckets in increasing order, then -1 (``L`` programs)."""
    g, n_buckets = table.shape
    device = table.device
    count = table.sum(1, dtype=torch.int32)
    length = batch * per_row
    if INTERPRETER_BLOCKS:  # on the CPU reading the count back is free: no programs without a bucket
        length = min(length, int(count.max()))
    if length == 0:
        return None
    # A stable partition of the bucket ids (table buckets first): a permutation, so the scatter writes
    # every slot once.
    ranks = torch.cumsum(table, 1, dtype=torch.int32)
    others = torch.arange(1, n_buckets + 1, dtype=torch.int32, device=device) - ranks
    dest = torch.where(table, ranks - 1, count[:, None] + others - 1).long()
    ids = torch.arange(n_buckets, dtype=torch.int32, device=device).expand(g, n_buckets)
    order = torch.empty((g, n_buckets), dtype=torch.int32, device=device).scatter_(1, dest, ids)
    listed = torch.arange(length, device=device)[None, :] < count[:, None]
    return torch.where(listed, order[:, :length], -1).contiguous()


def _without(srt, table):
    """The sort with the tokens of the table-form buckets moved past the end (stable): the pair kernel
    then visits only the pair-form buckets, which look empty to it otherwise."""
    g, tokens = srt.perm.shape
    dropped = torch.gather(table, 1, srt.bucket.long())
    kept = torch.cumsum(~dropped, 1, dtype=torch.int32)
    position = torch.arange(1, tokens + 1, dtype=torch.int32, device=table.device)
    dest = torch.where(dropped, kept[:, -1:] + position - kept - 1, kept - 1).long()
    perm = torch.empty_like(srt.perm).scatter_(1, dest, srt.perm)
    bucket = torch.empty_like(srt.bucket).scatter_(1, dest, srt.bucket)
    counts = torch.where(table, 0, srt.start[:, 1:] - srt.start[:, :-1])
    start = torch.cat([srt.start[:, :1], torch.cumsum(counts, 1, dtype=torch.int32)], dim=1)
    return _Segments(perm, bucket, start, srt.n_buckets)


def _plan_bytes(batch, hash_bits, n_q, n_k):
    """Scratch per hash of the per-bucket choice (flags, costs, the bucket list; the pair kernel's copy of
    both sorts): about 50 bytes per bucket and 35 per token and side."""
    return 50 * (batch << hash_bits) + 35 * batch * (n_q + n_k)


def sampled_grads(
    q_codes, k_codes, q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, backward, max_ratio, form="auto"
):
    """dq, dk per hash group: queries and keys sorted by (bucket, position), then the pair kernel
    (``kernels/pairs.py``) over the pair-form buckets and the table kernel (``kernels/tables.py``, dq and
    dk sides) over the table-form ones, all adding into the same int64 fixed-point rows.

    ``form`` (docs/math.md#lower-bound): ``"auto"`` chooses per bucket by cost (``_table_buckets``; the
    exact estimator always takes pairs), ``"pairs"`` / ``"tables"`` force one form for every bucket.
    """
    # form is one of FORMS, and "tables" only with the lower bound: yoso.backends.Backend.sampled_grads checks.
    batch, m, n_q = q_codes.shape
    n_k, dim, dv = k.shape[1], q.shape[2], v.shape[2]
    q_codes, k_codes = _unit_stride(q_codes), _unit_stride(k_codes)
    weight_max = max_ratio if backward == "exact" else hash_bits / 2
    g_norm, q_norm = _row_norms(grad, query_mask), _row_norms(q, query_mask)
    v_norm, k_norm = _row_norms(v, key_mask), _row_norms(k, key_mask)
    # Bounds on |dq_i|, |dk_j| summed over every partial result (hashes, table tiles): each partial is
    # bounded by the same terms |G_i| |v_j| |k_j| (Cauchy-Schwarz over the Dv slices of a table).
    scale_q = _fixed_point_scales(weight_max * g_norm.amax(1) * (v_norm * k_norm).sum(1))
    scale_k = _fixed_point_scales(weight_max * v_norm.amax(1) * (g_norm * q_norm).sum(1))
    dq_acc = torch.zeros((batch * n_q, dim), dtype=torch.int64, device=q.device)
    dk_acc = torch.zeros((batch * n_k, dim), dtype=torch.int64, device=q.device)
    qmask, qmb, qmn, has_qmask = _mask_arg(query_mask, q)
    kmask, kmb, kmn, has_kmask = _mask_arg(key_mask, k)
    tables = backward == "lower_bound" and form != "pairs"
    per_hash = table_bytes(batch, hash_bits, max(n_q, n_k), 0)
    if tables:
        per_hash += _plan_bytes(batch, hash_bits, n_q, n_k)
    group = _hash_group(m, per_hash)
    dp, dvp = _pow2(dim), _pow2(dv)
    if INTERPRETER_BLOCKS:
        bb, br, bw = min(_pow2(batch << hash_bits), 1024), 256, 256
        tr = tw = 128
        bd, bdv = dp, dvp
    else:
        br = bw = 32 if max(dp, dvp) > 128 else 64
        # Enough buckets per program to fill a tile: ~N / 2**tau tokens per bucket and row.
        per_bucket = max(1, max(n_q, n_k) >> hash_bits)
        bb = min(64, 1 << max(0, int(math.log2(max(1, br // per_bucket)))))
        # Table form: a 64 x 64 fp32 tile of the D x Dv table per program, on 8 warps (benchmarks/NOTES.md:
        # 4 warps spill); fp32 inputs multiply on CUDA cores (ieee), whose operands live in registers:
        # 32-token tiles.
        tr = tw = 32 if q.dtype == torch.float32 else 64
        bd, bdv = min(dp, 64), min(dvp, 64)
    table_tiles = triton.cdiv(dim, bd) * triton.cdiv(dv, bdv)
    for s0 in range(0, m, group):
        hashes = slice(s0, min(m, s0 + group))
        g = hashes.stop - hashes.start
        sq, sk = Sorted(q_codes, hashes, hash_bits), Sorted(k_codes, hashes, hash_bits)
        pair_q, pair_k, listed = sq, sk, None
        if tables:
            table, per_row = _table_buckets(sq, sk, form, dim, dv, hash_bits, n_q, n_k)
            if on_plan is not None:
                on_plan(hashes, table)
            if per_row > 0:
                listed = _bucket_list(table, per_row, batch)
            if form == "tables":
                pair_q = None
            elif listed is not None:
                pair_q, pair_k = _without(sq, table), _without(sk, table)
        elif on_plan is not None:
            on_plan(hashes, torch.zeros((g, sq.n_buckets), dtype=torch.bool, device=q.device))
        if pair_q is not None:
            kernels.bucket_pair_grads_kernel[(triton.cdiv(sq.n_buckets, bb), g)](
                q,
                k,
                v,
                grad,
                qmask,
                kmask,
                pair_q.perm,
                pair_q.bucket,
                pair_q.start,
                pair_k.perm,
                pair_k.bucket,
                pair_k.start,
                dq_acc,
                dk_acc,
                scale_q,
                scale_k,
                sq.n_buckets,
                batch * n_q,
                batch * n_k,
                n_q,
                n_k,
                dim,
                dv,
                *q.stride(),
                *k.stride(),
                *v.stride(),
                *grad.stride(),
                qmb,
                qmn,
                kmb,
                kmn,
                1.0 / m,
                float(max_ratio),
                TAU=hash_bits,
                EXACT=backward == "exact",
                CAUSAL=bool(causal),
                HAS_QMASK=has_qmask,
                HAS_KMASK=has_kmask,
                BB=bb,
                BR=br,
                BW=bw,
                DP=dp,
                DVP=dvp,
            )
        if listed is None:
            continue
        # dq: queries read tables of the keys' k v^T (keys j <= i when causal); dk: keys read tables of
        # the queries' q G^T (queries i >= j: the walk runs backwards).
        sides = (
            (grad, k, v, (qmask, qmb, qmn, has_qmask), (kmask, kmb, kmn, has_kmask), sq, sk, dq_acc, scale_q, False),
            (v, q, grad, (kmask, kmb, kmn, has_kmask), (qmask, qmb, qmn, has_qmask), sk, sq, dk_acc, scale_k, True),
        )
        for rx, wd, wx, rmask, wmask, rsort, wsort, acc, scale, reverse in sides:
            kernels.bucket_table_grads_kernel[(listed.shape[1], g, table_tiles)](
                rx,
                wd,
                wx,
                rmask[0],
                wmask[0],
                rsort.perm,
                rsort.start,
                wsort.perm,
                wsort.start,
                listed,
                acc,
                scale,
                rsort.start.stride(0),
                listed.stride(0),
                triton.cdiv(dv, bdv),
                rsort.perm.shape[1],
                wsort.perm.shape[1],
                rx.shape[1],
                wd.shape[1],
                dim,
                dv,
                *rx.stride(),
                *wd.stride(),
                *wx.stride(),
                rmask[1],
                rmask[2],
                wmask[1],
                wmask[2],
                hash_bits / 2 / m,
                CAUSAL=bool(causal),
                REVERSE=bool(causal) and reverse,
                HAS_RMASK=rmask[3],
                HAS_WMASK=wmask[3],
                BR=tr,
                BW=tw,
                BD=bd,
                BDV=bdv,
                num_warps=8,
            )
    dq = dq_acc.view(batch, n_q, dim).double() / scale_q.double()[:, None, None]
    dk = dk_acc.view(batch, n_k, dim).double() / scale_k.double()[:, None, None]
    return dq.to(q.dtype), dk.to(k.dtype)


# ---- YOSO-E ---------------------------------------------------------------------------------------


def _expectation_blocks(n_q, n_k, dim, dv):
    if INTERPRETER_BLOCKS:
        return min(_pow2(n_q), 128), min(_pow2(n_k), 128)
    wide = max(dim, dv) > 128
    return (64, 32) if wide else (64, 64)


def expectation_forward(q, k, v, *, query_mask, key_mask, causal, hash_bits):
    qmask, qmb, qmn, has_qmask = _mask_arg(query_mask, q)
    kmask, kmb, kmn, has_kmask = _mask_arg(key_mask, k)
    batch, n_q, dim = q.shape
    n_k, dv = k.shape[1], v.shape[2]
    out = torch.empty((batch, n_q, dv), dtype=torch.float32, device=q.device)
    bm, bn = _expectation_blocks(n_q, n_k, dim, dv)
    kernels.expectation_forward_kernel[(batch * triton.cdiv(n_q, bm),)](
        q,
        k,
        v,
        qmask,
        kmask,
        out,
        n_q,
        n_k,
        dim,
        dv,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        qmb,
        qmn,
        kmb,
        kmn,
        TAU=hash_bits,
        CAUSAL=bool(causal),
        HAS_QMASK=has_qmask,
        HAS_KMASK=has_kmask,
        BM=bm,
        BN=bn,
        DP=_pow2(dim),
        DVP=_pow2(dv),
    )
    return out


def expectation_backward(q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, backward, max_ratio):
    qmask, qmb, qmn, has_qmask = _mask_arg(query_mask, q)
    kmask, kmb, kmn, has_kmask = _mask_arg(key_mask, k)
    batch, n_q, dim = q.shape
    n_k, dv = k.shape[1], v.shape[2]
    dq = torch.empty((batch, n_q, dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, n_k, dim), dtype=k.dtype, device=q.device)
    dvv = torch.empty((batch, n_k, dv), dtype=v.dtype, device=q.device)
    bm, bn = _expectation_blocks(n_q, n_k, dim, dv)
    common = (
        n_q,
        n_k,
        dim,
        dv,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *grad.stride(),
        qmb,
        qmn,
        kmb,
        kmn,
        float(max_ratio),
    )
    meta = dict(
        TAU=hash_bits,
        EXACT=backward == "exact",
        CAUSAL=bool(causal),
        HAS_QMASK=has_qmask,
        HAS_KMASK=has_kmask,
        BM=bm,
        BN=bn,
        DP=_pow2(dim),
        DVP=_pow2(dv),
    )
    kernels.expectation_dq_kernel[(batch * triton.cdiv(n_q, bm),)](q, k, v, grad, qmask, kmask, dq, *common, **meta)
    kernels.expectation_dkdv_kernel[(batch * triton.cdiv(n_k, bn),)](
        q, k, v, grad, qmask, kmask, dk, dvv, *common, **meta
    )
    return dq, dk, dvv
