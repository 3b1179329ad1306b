"""The primitives of the ``cuda`` backend on torch CUDA tensors: launch configuration and kernel launches.

The functions named like the primitives of ``yoso.backends.Backend`` are the backend's primitives
(``CudaBackend.module``) and take exactly their arguments. Those arrive checked: the API has
validated shapes, dtypes, devices and ranges (``yoso._validate.prepare``) and ``CudaBackend.unsupported``
has accepted the call (head dims, hash_bits, grid limits), so nothing here re-checks them. Inputs are
used in place when contiguous (zero-copy; ``.contiguous()`` copies only strided views); outputs are
new fp32 tensors (codes int32) on the inputs' device.

Nothing here asks the tensors' device type: tests run these functions on CPU tensors with
``_runtime.launch`` replaced by a recorder, to check every launch plan without a GPU.
"""

from __future__ import annotations

import math

from . import _plans, _runtime
from ._kernels import ELEMENT_TYPES, ORDERS
from ._plans import FORMS, SMEM_BUDGET

THREADS = 256


def _torch():
    import torch

    return torch


def element_type(x) -> str:
    return ELEMENT_TYPES[str(x.dtype).removeprefix("torch.")]


def _mask(mask):
    """A bool [B, N] mask as contiguous bytes (a zero-copy view when contiguous), or None."""
    return None if mask is None else mask.contiguous().view(_torch().uint8)


def _smem_budget(device) -> int:
    return min(SMEM_BUDGET, _runtime.max_shared_memory(device.index if device.index is not None else 0))


# ---- hashing --------------------------------------------------------------------------------------


def hash_codes(x, planes, *, hashing: str, num_hashes: int, hash_bits: int):
    torch = _torch()
    x = x.contiguous()
    batch, n, dim = x.shape
    m, tau = num_hashes, hash_bits
    planes = planes.to(torch.float32).contiguous()
    codes = torch.empty((batch, m, n), dtype=torch.int32, device=x.device)
    batched = int(planes.shape[0] == batch and batch > 1)
    t = element_type(x)
    tiles = math.ceil(n / 32)
    if hashing == "gaussian":
        tau_pad = 4 * math.ceil(tau / 4)
        x_bytes = 32 * (dim + 1) * 4
        per_hash = dim * tau_pad * 4
        chunk = max(1, min(m, (_smem_budget(x.device) - x_bytes) // per_hash))
        smem = x_bytes + chunk * per_hash
        args = [_runtime.pointer(x), _runtime.pointer(planes), _runtime.pointer(codes)]
        args += [_runtime.i32(v) for v in (n, dim, m, tau, batched, chunk)]
        _runtime.launch(x.device, "hashing", f"hash_gaussian<{t}, {tau_pad}>", (tiles, batch), THREADS, smem, args)
    else:
        rotations, d_pad = planes.shape[1], planes.shape[3]
        slots = max(1, d_pad // 32)
        args = [_runtime.pointer(x), _runtime.pointer(planes), _runtime.pointer(codes)]
        args += [_runtime.i32(v) for v in (n, dim, d_pad, m, tau, rotations, batched)]
        _runtime.launch(
            x.device, "hashing", f"hash_hadamard<{t}, {slots}>", (tiles, rotations, batch), THREADS, 0, args
        )
    return codes


# ---- cumulation ---------------------------------------------------------------------------------


def cumulate_config(num_hashes: int, hash_bits: int, channels: int, budget: int) -> tuple[int, int, int, int]:
    """(channels per block CS, hashes per block, groups, warps) so that the tables fit ``budget`` bytes."""
    buckets = 1 << hash_bits

    def smem(cs: int, hashes: int) -> int:
        warps = min(8, hashes)
        return 4 * (hashes * buckets * cs + 32 * cs + warps * 32 * cs)

    for cs in (4, 2, 1):
        if cs > 1 and cs > channels:
            continue
        if smem(cs, num_hashes) <= budget:
            return cs, num_hashes, 1, min(8, num_hashes)
    per_block = (budget - smem(1, 0) - 4 * 8 * 32) // (4 * buckets)
    if per_block < 1:  # CudaBackend.max_hash_bits keeps every call away from this (tests/test_limits.py)
        raise RuntimeError(f"hash_bits={hash_bits}: one bucket table ({4 * buckets} bytes) exceeds {budget} bytes")
    groups = math.ceil(num_hashes / per_block)
    hashes = math.ceil(num_hashes / groups)
    return 1, hashes, groups, min(8, hashes)


def cumulation_smem(cs: int, hashes: int, warps: int, hash_bits: int) -> int:
    return 4 * (hashes * (1 << hash_bits) * cs + 32 * cs + warps * 32 * cs)


def cumulate(read_codes, write_codes, values, *, read_mask, write_mask, order: str, hash_bits: int):
    torch = _torch()
    values = values.contiguous()
    batch, n_write, channels = values.shape
    read_codes, write_codes = read_codes.contiguous(), write_codes.contiguous()
    tau = hash_bits
    m, n_read = read_codes.shape[1], read_codes.shape[2]
    read_mask, write_mask = _mask(read_mask), _mask(write_mask)

    cs, hashes, groups, warps = cumulate_config(m, tau, channels, _smem_budget(values.device))
    out = torch.empty((batch, n_read, channels), dtype=torch.float32, device=values.device)
    intra = None
    if order != "none":
        intra = torch.empty((batch, m, n_read), dtype=torch.int32, device=values.device)
        chunks = math.ceil(n_read / 32)
        args = [_runtime.pointer(read_codes), _runtime.pointer(write_codes), _runtime.pointer(write_mask)]
        args += [_runtime.pointer(intra), _runtime.i32(m), _runtime.i32(n_read)]
        name = f"cumulate_intra_masks<{ORDERS[order]}>"
        _runtime.launch(values.device, "cumulate", name, (math.ceil(chunks / 8), m, batch), THREADS, 0, args)
    target = (
        out if groups == 1 else torch.empty((groups, batch, n_read, channels), dtype=torch.float32, device=out.device)
    )
    args = [_runtime.pointer(t) for t in (read_codes, write_codes, values, read_mask, write_mask, intra, target)]
    args += [_runtime.i32(v) for v in (batch, m, n_read, n_write, channels, tau, hashes)]
    args += [_runtime.f32(1.0 / m)]
    name = f"cumulate_scan<{element_type(values)}, {cs}, {ORDERS[order]}>"
    smem = cumulation_smem(cs, hashes, warps, tau)
    _runtime.launch(values.device, "cumulate", name, (math.ceil(channels / cs), groups, batch), 32 * warps, smem, args)
    if groups > 1:
        size = out.numel()
        args = [_runtime.pointer(target), _runtime.pointer(out), _runtime.i64(size), _runtime.i32(groups)]
        _runtime.launch(
            values.device, "cumulate", "cumulate_sum_groups", (min(4096, math.ceil(size / THREADS)),), THREADS, 0, args
        )
    return out


# ---- each bucket's run of tokens: the sampled gradients and the bucket tables ---------------------------


def _bucket_runs(codes, hash_bits: int):
    """Per hash, the positions sorted by (code, position) -- a stable sort of the codes -- and the run of
    every bucket: ``(order [B, m, N], start [B, m, 2**tau + 1])``, bucket c's tokens being
    ``order[start[c]:start[c + 1]]`` in position order (int32, contiguous)."""
    torch = _torch()
    batch, m = codes.shape[:2]
    buckets = 1 << hash_bits
    bounds = torch.arange(buckets + 1, dtype=torch.int32, device=codes.device).expand(batch, m, buckets + 1)
    ordered, order = torch.sort(codes, dim=-1, stable=True)
    start = torch.searchsorted(ordered, bounds.contiguous(), out_int32=True)
    return order.to(torch.int32).contiguous(), start.contiguous()


# ---- the pairwise pieces: sampled gradients and YOSO-E -------------------------------------------------


def _grad(grad):
    """The output gradient as the kernels read it: contiguous float32."""
    return grad.float().contiguous()


def _tiles(dim: int, value_dim: int) -> int:
    return 32 if dim + value_dim <= 256 else 16


def _pair_smem(tq: int, tk: int, dim: int, value_dim: int, *, q_grad: bool, k_value: bool, weights: int) -> int:
    floats_ = tq * (dim + 1) + (tq * (value_dim + 1) if q_grad else 0)
    floats_ += tk * (dim + 1) + (tk * (value_dim + 1) if k_value else 0)
    floats_ += weights * max(tq, tk) * (min(tq, tk) + 1)
    return 4 * floats_ + 4 * (tq + tk)


def sampled_grads(
    q_codes,
    k_codes,
    q,
    k,
    v,
    grad,
    *,
    query_mask,
    key_mask,
    causal: bool,
    hash_bits: int,
    backward: str,
    max_ratio: float,
    form: str = "auto",
):
    # form: "auto" decides per bucket on the device (use_tables in common.cuh), "pairs" / "tables" force
    # one form for every bucket. Not an API-validated argument (only tests and benchmarks pass it), so
    # it is checked here: _plans.lower_bound_form raises ValueError naming it.
    code = _plans.lower_bound_form(form, backward)
    torch = _torch()
    q, k, v, grad = q.contiguous(), k.contiguous(), v.contiguous(), _grad(grad)
    batch, n_query, dim = q.shape
    n_key, value_dim = k.shape[1], v.shape[2]
    q_codes, k_codes = q_codes.contiguous(), k_codes.contiguous()
    m, tau = q_codes.shape[1], hash_bits
    query_mask, key_mask = _mask(query_mask), _mask(key_mask)

    # Both forms use the same runs of each side, and decide from their lengths which of them takes a bucket.
    buckets = 1 << tau
    q_order, q_start = _bucket_runs(q_codes, tau)
    k_order, k_start = _bucket_runs(k_codes, tau)
    dq = torch.zeros((batch, n_query, dim), dtype=torch.float32, device=q.device)
    dk = torch.zeros((batch, n_key, dim), dtype=torch.float32, device=q.device)
    pointers = [q, k, v, grad, q_order, q_start, k_order, k_start, query_mask, key_mask, dq, dk]
    t = element_type(q)
    sizes = (m, n_query, n_key, dim, value_dim, tau)
    if code != FORMS["tables"]:
        tile = _tiles(dim, value_dim)
        pair_smem = _pair_smem(tile, tile, dim, value_dim, q_grad=True, k_value=True, weights=1) + 4 * 2 * tile
        pair_name = f"sampled_grads_hash<{t}, {int(backward == 'exact')}, {tile}>"
    if code != FORMS["pairs"]:
        plan = _plans.table_plan(dim, value_dim, _smem_budget(q.device))
        if plan is None:  # CudaBackend.unsupported keeps every call away from this (tests/test_limits.py)
            raise RuntimeError(f"no table-form plan fits D={dim}, Dv={value_dim} in shared memory")
        table_tile, ds = plan
        slices = _plans.table_slices(dim, plan)
        table_smem = _plans.table_smem(table_tile, ds, value_dim)
        table_name = f"sampled_grads_tables<{t}, {table_tile}, {ds}>"
    # One step per hash: within a hash every row lies in one bucket, and each bucket is done by one
    # block of one of the two kernels (the only writer of its rows), so the steps add the hashes into
    # dq, dk in a fixed order.
    for s in range(m):
        args = [_runtime.pointer(x) for x in pointers]
        args += [_runtime.i32(x) for x in (*sizes, s, int(causal), code)]
        if code != FORMS["tables"]:
            pair_args = args + [_runtime.f32(max_ratio), _runtime.f32(1.0 / m)]
            _runtime.launch(q.device, "sampled_grads", pair_name, (buckets, batch), THREADS, pair_smem, pair_args)
        if code != FORMS["pairs"]:
            table_args = args + [_runtime.i32(slices), _runtime.f32(0.5 * tau / m)]
            grid = _plans.table_grid(tau, slices, batch)
            _runtime.launch(q.device, "sampled_tables", table_name, grid, THREADS, table_smem, table_args)
    return dq, dk


def expectation_forward(q, k, v, *, query_mask, key_mask, causal: bool, hash_bits: int):
    torch = _torch()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, n_query, dim = q.shape
    n_key, value_dim = k.shape[1], v.shape[2]
    query_mask, key_mask = _mask(query_mask), _mask(key_mask)
    tile = _tiles(dim, value_dim)
    out = torch.empty((batch, n_query, value_dim), dtype=torch.float32, device=q.device)
    smem = 4 * (tile * (dim + 1) * 2 + tile * (value_dim + 1) + tile * (tile + 1)) + 4 * 2 * tile
    args = [_runtime.pointer(t) for t in (q, k, v, query_mask, key_mask, out)]
    args += [_runtime.i32(x) for x in (n_query, n_key, dim, value_dim, int(hash_bits), int(causal))]
    name = f"expectation_forward<{element_type(q)}, {tile}, {tile}>"
    _runtime.launch(q.device, "expectation", name, (math.ceil(n_query / tile), batch), THREADS, smem, args)
    return out


def expectation_backward(
    q,
    k,
    v,
    grad,
    *,
    query_mask,
    key_mask,
    causal: bool,
    hash_bits: int,
    backward: str,
    max_ratio: float,
):
    torch = _torch()
    q, k, v, grad = q.contiguous(), k.contiguous(), v.contiguous(), _grad(grad)
    batch, n_query, dim = q.shape
    n_key, value_dim = k.shape[1], v.shape[2]
    query_mask, key_mask = _mask(query_mask), _mask(key_mask)
    tile = _tiles(dim, value_dim)
    exact = int(backward == "exact")
    dq = torch.empty((batch, n_query, dim), dtype=torch.float32, device=q.device)
    dk = torch.empty((batch, n_key, dim), dtype=torch.float32, device=q.device)
    dv = torch.empty((batch, n_key, value_dim), dtype=torch.float32, device=q.device)
    rows = 4 * tile * (dim + 1 + value_dim + 1) * 2
    t = element_type(q)
    common = [_runtime.i32(x) for x in (n_query, n_key, dim, value_dim, int(hash_bits), int(causal))]
    args = [_runtime.pointer(x) for x in (q, k, v, grad, query_mask, key_mask, dq)] + common
    args += [_runtime.f32(max_ratio)]
    smem = rows + 4 * tile * (tile + 1) + 4 * 2 * tile
    name = f"expectation_dq<{t}, {exact}, {tile}, {tile}>"
    _runtime.launch(q.device, "expectation", name, (math.ceil(n_query / tile), batch), THREADS, smem, args)
    args = [_runtime.pointer(x) for x in (q, k, v, grad, query_mask, key_mask, dk, dv)] + common
    args += [_runtime.f32(max_ratio)]
    smem = rows + 2 * 4 * tile * (tile + 1) + 4 * 2 * tile
    name = f"expectation_dkv<{t}, {exact}, {tile}, {tile}>"
    _runtime.launch(q.device, "expectation", name, (math.ceil(n_key / tile), batch), THREADS, smem, args)
    return dq, dk, dv


# ---- the bucket tables (kernels/tables.cu; docs/math.md#bucket-tables) -----------------------------------


def _codes(codes):
    """Codes as the kernels read them: contiguous int32. The primitives take any integer dtype (docs/
    architecture.md#the-primitive-contract); the backend's own codes are int32 already and are not copied."""
    return codes.to(_torch().int32).contiguous()


def _tokens(values, outer):
    """``(values, outer, C, F)`` as the table kernels read them: contiguous, one element type for both
    (fp32 when their dtypes differ, as in the backward's ``bucket_tables(grad, outer=q)``), ``F = 0``
    without ``outer``."""
    if outer is not None and outer.dtype != values.dtype:
        values, outer = values.float(), outer.float()
    values = values.contiguous()
    outer = None if outer is None else outer.contiguous()
    return values, outer, values.shape[2], 0 if outer is None else outer.shape[2]


def _sum_tables(codes, values, mask, hash_bits: int, outer, base):
    """``base + bucket_tables(...)`` (``base`` None: the tables alone), each entry written once."""
    torch = _torch()
    codes = _codes(codes)
    values, outer, channels, width = _tokens(values, outer)
    batch, m, n = codes.shape
    entries = channels * max(width, 1)
    shape = (batch, m, 1 << hash_bits, channels) + ((width,) if outer is not None else ())
    tables = torch.empty(shape, dtype=torch.float32, device=values.device)
    order, start = _bucket_runs(codes, hash_bits)
    base = None if base is None else base.contiguous()
    mask = _mask(mask)  # held here: a temporary copy would be freed before the kernel reads it
    args = [_runtime.pointer(x) for x in (order, start, values, outer, mask, base, tables)]
    args += [_runtime.i32(x) for x in (m, n, channels, width, hash_bits)]
    grid = (math.ceil((1 << hash_bits) * entries / THREADS), m, batch)
    _runtime.launch(values.device, "tables", f"bucket_tables_sum<{element_type(values)}>", grid, THREADS, 0, args)
    return tables


def bucket_tables(codes, values, *, mask, hash_bits: int, outer=None):
    return _sum_tables(codes, values, mask, hash_bits, outer, None)


def add_to_tables(tables, codes, values, *, mask, hash_bits: int, outer=None):
    # A short chunk (a decoding step) walks its tokens into a copy of the tables: O(m * channels) per
    # token after the copy. A longer one sums each bucket's run once and adds it to the old entry.
    n = codes.shape[2]
    if n > _plans.ADD_WALK_MAX_TOKENS:
        return _sum_tables(codes, values, mask, hash_bits, outer, tables)
    codes = _codes(codes)
    values, outer, channels, width = _tokens(values, outer)
    batch, m = codes.shape[:2]
    out = tables.clone(memory_format=_torch().contiguous_format)
    mask = _mask(mask)  # held here: a temporary copy would be freed before the kernel reads it
    args = [_runtime.pointer(x) for x in (codes, values, outer, mask, out)]
    args += [_runtime.i32(x) for x in (m, n, channels, width, hash_bits)]
    grid = (math.ceil(channels * max(width, 1) / THREADS), m, batch)
    _runtime.launch(values.device, "tables", f"bucket_tables_walk<{element_type(values)}>", grid, THREADS, 0, args)
    return out


def read_buckets(codes, tables, *, mask, weights=None):
    torch = _torch()
    codes, tables = _codes(codes), tables.contiguous()
    batch, m, n = codes.shape
    hash_bits = int(tables.shape[2]).bit_length() - 1
    channels = tables.shape[3]
    mask = _mask(mask)
    if weights is None:
        out = torch.empty((batch, n, channels), dtype=torch.float32, device=tables.device)
        args = [_runtime.pointer(x) for x in (codes, tables, mask, out)]
        args += [_runtime.i32(x) for x in (m, n, channels, hash_bits)]
        grid = (math.ceil(n * channels / THREADS), batch)
        _runtime.launch(tables.device, "tables", "read_buckets_plain", grid, THREADS, 0, args)
        return out
    weights = weights.contiguous()
    width = tables.shape[4]
    out = torch.empty((batch, n, width), dtype=torch.float32, device=tables.device)
    args = [_runtime.pointer(x) for x in (codes, tables, weights, mask, out)]
    args += [_runtime.i32(x) for x in (m, n, channels, width, hash_bits)]
    name = f"read_buckets_weighted<{element_type(weights)}>"
    _runtime.launch(tables.device, "tables", name, (math.ceil(n * width / THREADS), batch), THREADS, 0, args)
    return out
