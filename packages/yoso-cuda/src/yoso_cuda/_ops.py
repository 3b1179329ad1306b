"""The primitives on torch CUDA tensors: argument checks, launch configuration, kernel launches.

Every check runs before the first launch and raises ValueError/TypeError naming the argument and
its shape, dtype or device. Inputs are used in place when contiguous (zero-copy; ``.contiguous()``
copies only strided views); outputs are new fp32 tensors (codes int32) on the inputs' device.
"""

from __future__ import annotations

import math

from . import _runtime
from ._kernels import ELEMENT_TYPES, ORDERS

MAX_DIM = 256  # D and Dv
MAX_HASH_BITS_TABLES = 12  # cumulation tables 2^tau per hash and channel must fit shared memory
MAX_HASH_BITS_CODES = 16
MAX_GRID_YZ = 65535
THREADS = 256
SMEM_BUDGET = 96 * 1024  # per block; leaves room for two blocks per SM on sm_80/sm_90


def _torch():
    import torch

    return torch


def _shape(x) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def tensor(name: str, x, *, ndim: int, like=None, dtypes=None, device_type: str = "cuda"):
    """Check one tensor argument; returns it contiguous. ``like``: the tensor whose device it must share."""
    torch = _torch()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != device_type:
        raise ValueError(f"{name} is on {x.device}; the 'cuda' backend computes on CUDA tensors (move it with .cuda())")
    if like is not None and x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {like.device}: use one device")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {_shape(x)}")
    if dtypes is not None and str(x.dtype).removeprefix("torch.") not in dtypes:
        raise TypeError(
            f"{name} has dtype {str(x.dtype).removeprefix('torch.')}; the 'cuda' backend supports {', '.join(dtypes)}"
        )
    return x.contiguous()


def floats(name: str, x, *, ndim: int, like=None, device_type: str = "cuda"):
    return tensor(name, x, ndim=ndim, like=like, dtypes=tuple(ELEMENT_TYPES), device_type=device_type)


def codes_arg(name: str, x, *, like, device_type: str = "cuda"):
    torch = _torch()
    x = tensor(name, x, ndim=3, like=like, device_type=device_type)
    if x.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise TypeError(f"{name} must hold integer hash codes, got dtype {str(x.dtype).removeprefix('torch.')}")
    return x.to(torch.int32)


def mask_arg(name: str, x, batch: int, length: int, *, like, device_type: str = "cuda"):
    """A bool [B, N] mask as bytes (a zero-copy view), or None."""
    torch = _torch()
    if x is None:
        return None
    x = tensor(name, x, ndim=2, like=like, device_type=device_type)
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {str(x.dtype).removeprefix('torch.')}")
    if tuple(x.shape) != (batch, length):
        raise ValueError(f"{name} must have shape [{batch}, {length}], got {_shape(x)}")
    return x.view(torch.uint8)


def element_type(x) -> str:
    return ELEMENT_TYPES[str(x.dtype).removeprefix("torch.")]


def check_dims(**dims) -> None:
    for name, value in dims.items():
        if value > MAX_DIM:
            raise ValueError(f"{name}={value} exceeds the 'cuda' backend's limit of {MAX_DIM}")


def check_grid(**dims) -> None:
    for name, value in dims.items():
        if value > MAX_GRID_YZ:
            raise ValueError(
                f"{name}={value} exceeds the 'cuda' backend's limit of {MAX_GRID_YZ} (a CUDA grid dimension)"
            )


def check_hash_bits(hash_bits: int, limit: int) -> None:
    if not 1 <= int(hash_bits) <= limit:
        raise ValueError(f"hash_bits={hash_bits} is outside the 'cuda' backend's range [1, {limit}] for this primitive")


def _smem_budget(device) -> int:
    return min(SMEM_BUDGET, _runtime.max_shared_memory(device.index if device.index is not None else 0))


# ---- hashing --------------------------------------------------------------------------------------


def hash_codes(x, planes, *, hashing: str, num_hashes: int, hash_bits: int, device_type: str = "cuda"):
    torch = _torch()
    x = floats("x", x, ndim=3, device_type=device_type)
    batch, n, dim = x.shape
    m, tau = int(num_hashes), int(hash_bits)
    check_hash_bits(tau, MAX_HASH_BITS_CODES)
    check_dims(D=dim)
    check_grid(batch=batch)
    if hashing not in ("gaussian", "hadamard"):
        raise ValueError(f"hashing must be 'gaussian' or 'hadamard', got {hashing!r}")
    planes = tensor("planes", planes, ndim=4, like=x, device_type=device_type)
    if not planes.is_floating_point():
        raise TypeError(f"planes must be floating point, got {planes.dtype}")
    if hashing == "gaussian":
        expected = (m, tau, dim)
    else:
        d_pad = 1 << max(0, dim - 1).bit_length()
        if tau > d_pad:
            raise ValueError(f"hashing='hadamard' needs hash_bits <= {d_pad} (the Hadamard size for D={dim})")
        per = d_pad // tau
        expected = (-(-m // per), 3, d_pad)
    if tuple(planes.shape[1:]) != expected or planes.shape[0] not in (1, batch):
        raise ValueError(
            f"planes for hashing={hashing!r} with num_hashes={m}, hash_bits={tau}, D={dim} must have shape "
            f"[1 or {batch}, {', '.join(map(str, expected))}], got {_shape(planes)}"
        )
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
        rotations = expected[0]
        check_grid(rotations=rotations)
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
    if per_block < 1:
        raise ValueError(f"hash_bits={hash_bits}: one bucket table ({4 * buckets} bytes) exceeds shared memory")
    groups = math.ceil(num_hashes / per_block)
    hashes = math.ceil(num_hashes / groups)
    return 1, hashes, groups, min(8, hashes)


def cumulation_smem(cs: int, hashes: int, warps: int, hash_bits: int) -> int:
    return 4 * (hashes * (1 << hash_bits) * cs + 32 * cs + warps * 32 * cs)


def cumulate(
    read_codes, write_codes, values, *, read_mask, write_mask, order: str, hash_bits: int, device_type: str = "cuda"
):
    torch = _torch()
    values = floats("values", values, ndim=3, device_type=device_type)
    batch, n_write, channels = values.shape
    read_codes = codes_arg("read_codes", read_codes, like=values, device_type=device_type)
    write_codes = codes_arg("write_codes", write_codes, like=values, device_type=device_type)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {tuple(ORDERS)}, got {order!r}")
    tau = int(hash_bits)
    check_hash_bits(tau, MAX_HASH_BITS_TABLES)
    b_r, m, n_read = read_codes.shape
    if b_r != batch or tuple(write_codes.shape) != (batch, m, n_write):
        raise ValueError(
            f"codes must be [B, m, N] matching values [B, Nw, C] = {_shape(values)}: got read_codes "
            f"{_shape(read_codes)}, write_codes {_shape(write_codes)}"
        )
    if order != "none" and n_read != n_write:
        raise ValueError(f"order={order!r} needs as many readers as writers, got Nr={n_read}, Nw={n_write}")
    check_grid(batch=batch, num_hashes=m)
    read_mask = mask_arg("read_mask", read_mask, batch, n_read, like=values, device_type=device_type)
    write_mask = mask_arg("write_mask", write_mask, batch, n_write, like=values, device_type=device_type)

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


# ---- the pairwise pieces: sampled gradients and YOSO-E -------------------------------------------------


def _qkv(q, k, v, device_type):
    q = floats("q", q, ndim=3, device_type=device_type)
    k = floats("k", k, ndim=3, like=q, device_type=device_type)
    v = floats("v", v, ndim=3, like=q, device_type=device_type)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    batch, n_query, dim = q.shape
    if k.shape[0] != batch or k.shape[2] != dim or v.shape[0] != batch or v.shape[1] != k.shape[1]:
        raise ValueError(
            f"q [B, Nq, D], k [B, Nk, D], v [B, Nk, Dv] do not match: {_shape(q)}, {_shape(k)}, {_shape(v)}"
        )
    check_dims(D=dim, Dv=v.shape[2])
    check_grid(batch=batch)
    return q, k, v


def _grad(grad, q, v, device_type):
    grad = floats("grad", grad, ndim=3, like=q, device_type=device_type)
    expected = (q.shape[0], q.shape[1], v.shape[2])
    if tuple(grad.shape) != expected:
        raise ValueError(f"grad must have shape [{', '.join(map(str, expected))}] (B, Nq, Dv), got {_shape(grad)}")
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
    device_type: str = "cuda",
):
    torch = _torch()
    q, k, v = _qkv(q, k, v, device_type)
    grad = _grad(grad, q, v, device_type)
    batch, n_query, dim = q.shape
    n_key, value_dim = k.shape[1], v.shape[2]
    q_codes = codes_arg("q_codes", q_codes, like=q, device_type=device_type)
    k_codes = codes_arg("k_codes", k_codes, like=q, device_type=device_type)
    m = q_codes.shape[1]
    if tuple(q_codes.shape) != (batch, m, n_query) or tuple(k_codes.shape) != (batch, m, n_key):
        raise ValueError(
            f"q_codes must be [B, m, Nq] = [{batch}, m, {n_query}] and k_codes [{batch}, m, {n_key}], "
            f"got {_shape(q_codes)} and {_shape(k_codes)}"
        )
    if backward not in ("lower_bound", "exact"):
        raise ValueError(f"backward must be 'lower_bound' or 'exact', got {backward!r}")
    if causal and n_query != n_key:
        raise ValueError(f"causal=True needs as many queries as keys, got Nq={n_query}, Nk={n_key}")
    tau = int(hash_bits)
    check_hash_bits(tau, MAX_HASH_BITS_TABLES)
    query_mask = mask_arg("query_mask", query_mask, batch, n_query, like=q, device_type=device_type)
    key_mask = mask_arg("key_mask", key_mask, batch, n_key, like=q, device_type=device_type)

    # Per hash, each side sorted by (code, position) -- a stable sort of the codes -- and the run of
    # every bucket: the kernel's block for bucket c reads q_order[start[c]:start[c + 1]].
    buckets = 1 << tau
    bounds = torch.arange(buckets + 1, dtype=torch.int32, device=q.device).expand(batch, m, buckets + 1).contiguous()

    def runs(codes):
        ordered, order = torch.sort(codes, dim=-1, stable=True)
        start = torch.searchsorted(ordered, bounds, out_int32=True)
        return order.to(torch.int32).contiguous(), start.contiguous()

    q_order, q_start = runs(q_codes)
    k_order, k_start = runs(k_codes)
    dq = torch.zeros((batch, n_query, dim), dtype=torch.float32, device=q.device)
    dk = torch.zeros((batch, n_key, dim), dtype=torch.float32, device=q.device)
    tile = _tiles(dim, value_dim)
    smem = _pair_smem(tile, tile, dim, value_dim, q_grad=True, k_value=True, weights=1) + 4 * 2 * tile
    name = f"sampled_grads_hash<{element_type(q)}, {int(backward == 'exact')}, {tile}>"
    pointers = [q, k, v, grad, q_order, q_start, k_order, k_start, query_mask, key_mask, dq, dk]
    for s in range(m):  # one launch per hash: within a hash every row lies in one bucket (one writer)
        args = [_runtime.pointer(t) for t in pointers]
        args += [_runtime.i32(x) for x in (m, n_query, n_key, dim, value_dim, tau, s, int(causal))]
        args += [_runtime.f32(max_ratio), _runtime.f32(1.0 / m)]
        _runtime.launch(q.device, "sampled_grads", name, (buckets, batch), THREADS, smem, args)
    return dq, dk


def expectation_forward(q, k, v, *, query_mask, key_mask, causal: bool, hash_bits: int, device_type: str = "cuda"):
    torch = _torch()
    q, k, v = _qkv(q, k, v, device_type)
    batch, n_query, dim = q.shape
    n_key, value_dim = k.shape[1], v.shape[2]
    if causal and n_query != n_key:
        raise ValueError(f"causal=True needs as many queries as keys, got Nq={n_query}, Nk={n_key}")
    if not 1 <= int(hash_bits) <= 64:
        raise ValueError(f"hash_bits must be a positive int, got {hash_bits}")
    query_mask = mask_arg("query_mask", query_mask, batch, n_query, like=q, device_type=device_type)
    key_mask = mask_arg("key_mask", key_mask, batch, n_key, like=q, device_type=device_type)
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
    device_type: str = "cuda",
):
    torch = _torch()
    q, k, v = _qkv(q, k, v, device_type)
    grad = _grad(grad, q, v, device_type)
    batch, n_query, dim = q.shape
    n_key, value_dim = k.shape[1], v.shape[2]
    if backward not in ("exact", "lower_bound"):
        raise ValueError(f"backward must be 'exact' or 'lower_bound', got {backward!r}")
    if causal and n_query != n_key:
        raise ValueError(f"causal=True needs as many queries as keys, got Nq={n_query}, Nk={n_key}")
    if not 1 <= int(hash_bits) <= 64:
        raise ValueError(f"hash_bits must be a positive int, got {hash_bits}")
    query_mask = mask_arg("query_mask", query_mask, batch, n_query, like=q, device_type=device_type)
    key_mask = mask_arg("key_mask", key_mask, batch, n_key, like=q, device_type=device_type)
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
