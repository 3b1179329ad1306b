"""Kernels for transformers' own ``YosoModel`` (``transformers.models.yoso.modeling_yoso``), through yoso.

That model's sampled path (``use_expectation=False``) calls three functions on a module-level object
``lsh_cumulation``, which upstream is filled only by CUDA code fetched from the Hub at run time -- so on a
CPU (or without the download) it raises ``AttributeError: 'NoneType' object has no attribute 'fast_hash'``.
:func:`patch_yoso_model` installs :class:`YosoKernels` there. Conventions, as modeling_yoso calls them and
as the original CUDA kernels define them (``B`` = batch x heads):

* masks are int32 ``[B, N]`` (non-zero = real token), hash codes int32 ``[B, N, m]``;
* ``fast_hash(query_mask, query, key_mask, key, num_hash, hash_code_len, use_cuda, version)`` ->
  ``(query_codes, key_codes)``: m codes of tau = hash_code_len bits from a structured Hadamard rotation,
  drawn per batch row and shared by its queries and keys; masked tokens get code 0;
* ``lsh_cumulation(query_mask, query_codes, key_mask, key_codes, value, capacity, use_cuda, version)`` ->
  ``out_i = (1/m) sum_s sum_j [code_s(q_i) == code_s(k_j)] key_mask_j value_j`` (0 for masked queries);
* ``lsh_weighted_cumulation(query_mask, query_codes, query_weight, key_mask, key_codes, key_weight, value,
  capacity, use_cuda, version)`` -> the same with each colliding pair weighted by
  ``query_weight_i . key_weight_j`` (the model's lower-bound gradients).

``use_cuda`` and ``version`` are accepted and ignored: yoso's backend selection follows the tensors' device.

How it stays on the public API: :func:`yoso.attention` hashes vectors itself and has no entry point for
given codes, so the cumulations *encode* the codes as vectors whose hashes are those codes: with
``D = m*tau`` and the hyperplanes ``planes[s, b] = e_(s*tau + b)`` (the identity), the vector with
coordinate ``s*tau + b`` equal to ``+1`` if bit ``b`` of code ``s`` is set and ``-1`` otherwise hashes to
exactly those codes. ``yoso.attention(..., planes=identity, normalize=False)`` is then exactly
``lsh_cumulation``; a weighted cumulation is one call on the values ``key_weight_j (x) value_j`` followed
by contracting with ``query_weight_i``. ``fast_hash`` is :func:`yoso.hash_codes` with
``hashing="hadamard"``, whose planes (three ±1 diagonals per rotation, ``yoso.hash_planes``) take a leading
batch dim: one draw per batch row from torch's RNG, like upstream's kernel, so gradient checkpointing
replays it.

Two upstream bugs (transformers 5.23.0):

* ``hashing()`` (the ``use_fast_hash=False`` path) returns the *key* codes twice (``query_hash`` is
  overwritten), so queries are never hashed. ``patch_yoso_model(fix_hashing=True)`` (the default) replaces
  it with SimHash of both (:func:`yoso.hash_codes`, ``hashing="gaussian"``, on upstream's draw).
* Padding: ``YosoSelfAttention`` turns the 0/1 ``attention_mask`` into ``int(1.0 + mask / 10000.0)``, which
  is 1 for both 0 and 1, so every token is "real" and padded tokens change the outputs of real ones (in
  the sampled and the expectation path alike). The mask that expression does read correctly is
  ``(mask - 1) * 1e4`` (0 for real tokens, -1e4 for padded ones: ``int(1 - 1) = 0``), so the patch also
  wraps ``YosoSelfAttention.forward`` to hand it that form (:func:`additive_mask`): padding is then exact
  (tested, sampled and expectation path). Not with ``conv_window`` set (YOSO-C): the same mask multiplies
  the values of the convolution there, where it must stay 0/1, so such models are left as upstream has
  them, and padded tokens still change real ones -- use batches of equal-length sequences, or a BERT-family
  model with ``attn_implementation="yoso"`` (:func:`yoso_models.transformers.register`), whose padding is
  exact. The kernels honour whatever mask they are given (tested).
"""

from __future__ import annotations

import ast
import inspect

import yoso

# The calls modeling_yoso makes on its module-level `lsh_cumulation` object, with their positional
# argument counts: what the kernels below implement. A module that calls anything else is refused.
EXPECTED_CALLS = {"fast_hash": 8, "lsh_cumulation": 8, "lsh_weighted_cumulation": 10}
_MAX_WEIGHTED_COLUMNS = 1024  # value columns per yoso.attention call in lsh_weighted_cumulation


# ---- hash codes (yoso.hash_codes with the hash functions drawn the way upstream draws them) ------------


def _padded_dim(d: int) -> int:
    """``D'``, the Hadamard size for head dim ``d``: the next power of two (``yoso.hash_planes`` layout)."""
    return 1 << max(0, d - 1).bit_length()


def draw_diagonals(batch: int, dim: int, num_hash: int, hash_len: int, *, device, dtype):
    """Random ±1 diagonals ``[batch, R, 3, D']`` from torch's RNG (so checkpointing replays them).

    One set per batch row, as upstream's ``fast_hash`` draws them (its ``Dmat`` is ``[batch*heads, 3, R, D]``):
    every head of every sequence gets its own hash functions. The layout is ``hashing="hadamard"``'s
    (``yoso.hash_planes``) with a leading batch dim, which ``yoso.hash_codes`` broadcasts against ``x``'s.
    """
    import torch

    yoso.check_options(num_hashes=num_hash, hash_bits=hash_len, hashing="hadamard")
    d_pad = _padded_dim(dim)
    if hash_len > d_pad:
        raise ValueError(
            f"fast_hash needs hash_code_len <= {d_pad} (the Hadamard size for head dim {dim}), got {hash_len}"
        )
    rotations = -(-num_hash // (d_pad // hash_len))
    return (torch.randint(0, 2, (batch, rotations, 3, d_pad), device=device) * 2 - 1).to(dtype)


def hadamard_codes(mask, x, diagonals, num_hash: int, hash_len: int):
    """int32 codes ``[B, N, m]`` of the rows of ``x [B, N, D]`` under per-row ``diagonals [B, R, 3, D']``.

    Tokens with ``mask == 0`` get code 0 in every hash, as upstream's kernel leaves them (it skips masked
    rows of a zero-filled output): their rows are zeroed, whatever they hold, and a zero row's code is 0.
    """
    import torch

    x = torch.where(mask[..., None] != 0, x, torch.zeros_like(x))
    return yoso.hash_codes(x, planes=diagonals, num_hashes=num_hash, hash_bits=hash_len, hashing="hadamard")


def gaussian_hashing(query, key, num_hash: int, hash_len: int):
    """A fixed ``modeling_yoso.hashing``: SimHash codes of query *and* key under one draw of hyperplanes.

    Draws what upstream draws -- ``rmat [batch*heads, D, m*tau]`` from torch's RNG, column ``s*tau + b``
    the hyperplane of bit ``b`` of hash ``s`` -- and hashes both inputs with it through ``yoso.hash_codes``
    (``hashing="gaussian"``, its planes ``[batch*heads, m, tau, D]``).
    """
    import torch

    for name, x in (("query", query), ("key", key)):
        if x.dim() != 3:
            raise ValueError(f"{name} must be [batch*heads, seq_len, head_dim], got {list(x.shape)}")
    if key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2]:
        raise ValueError(f"query {list(query.shape)} and key {list(key.shape)} differ in batch or head dim")
    batch, dim = query.shape[0], query.shape[2]
    yoso.check_options(num_hashes=num_hash, hash_bits=hash_len)
    rmat = torch.randn(batch, dim, num_hash * hash_len, device=query.device, dtype=query.dtype)
    planes = rmat.reshape(batch, dim, num_hash, hash_len).permute(0, 2, 3, 1)
    options = dict(planes=planes, num_hashes=num_hash, hash_bits=hash_len, hashing="gaussian")
    return yoso.hash_codes(query, **options), yoso.hash_codes(key, **options)


# ---- the padding mask ----------------------------------------------------------------------------------


def additive_mask(mask):
    """A 0/1 ``attention_mask`` as ``(mask - 1) * 1e4``, the form ``int(1.0 + mask / 10000.0)`` reads right.

    Only a 0/1 mask with at least one real token is converted: a mask already in that form (0 and -1e4) is
    returned as it is, and so is one of zeros alone, which upstream reads as "every token real" (a 0/1 mask
    with no real token at all means nothing). The decision is a tensor ``where``, so ``torch.compile``
    traces it.
    """
    import torch

    zero_one = ((mask == 0) | (mask == 1)).all() & (mask == 1).any()
    return torch.where(zero_one, (mask - 1) * 1e4, mask.to(torch.promote_types(mask.dtype, torch.float32)))


def _exact_padding_forward(forward):
    """``YosoSelfAttention.forward`` handed :func:`additive_mask` of its mask (not for YOSO-C: module docstring)."""
    import functools

    @functools.wraps(forward)
    def patched(self, hidden_states, attention_mask=None, *args, **kwargs):
        if attention_mask is not None and not getattr(self, "use_conv", False):
            attention_mask = additive_mask(attention_mask)
        return forward(self, hidden_states, attention_mask, *args, **kwargs)

    patched.__yoso_original__ = forward
    return patched


# ---- the kernels object ------------------------------------------------------------------------------


def _hash_bits(capacity) -> int:
    bits = int(capacity).bit_length() - 1
    if capacity < 2 or 1 << bits != capacity:
        raise ValueError(f"hashtable_capacity must be 2**hash_code_len (a power of two >= 2), got {capacity}")
    return bits


def _check_codes(name, codes, mask_name, mask, capacity):
    import torch

    if codes.dim() != 3 or codes.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name} must be int32 [batch*heads, seq_len, num_hash], got {codes.dtype} {list(codes.shape)}"
        )
    if mask.shape != codes.shape[:2]:
        raise ValueError(
            f"{mask_name} must be [batch*heads, seq_len] = {list(codes.shape[:2])}, got {list(mask.shape)}"
        )
    if not torch.compiler.is_compiling() and codes.numel() and not bool(((codes >= 0) & (codes < capacity)).all()):
        raise ValueError(f"{name} has codes outside [0, hashtable_capacity={capacity})")


def _encode(codes, hash_len: int, dtype):
    """int codes ``[B, N, m]`` -> ±1 vectors ``[B, N, m*tau]`` whose identity-plane hashes are the codes."""
    import torch

    bits = (codes[..., None] >> torch.arange(hash_len, device=codes.device, dtype=codes.dtype)) & 1
    return (bits.to(dtype) * 2 - 1).reshape(*codes.shape[:-1], codes.shape[-1] * hash_len)


class YosoKernels:
    """What ``modeling_yoso.lsh_cumulation`` must provide, on :func:`yoso.attention` (module docstring)."""

    def __init__(self, module=None, previous=None, previous_hashing=None, previous_forward=None):
        self.module, self.previous, self.previous_hashing = module, previous, previous_hashing
        self.previous_forward = previous_forward

    def fast_hash(
        self, query_mask, query_vector, key_mask, key_vector, num_hash, hash_code_len, use_cuda=None, version=1
    ):
        for name, x in (("query_vector", query_vector), ("key_vector", key_vector)):
            if x.dim() != 3:
                raise ValueError(f"{name} must be [batch*heads, seq_len, head_dim], got {list(x.shape)}")
        if query_vector.shape[0] != key_vector.shape[0] or query_vector.shape[2] != key_vector.shape[2]:
            raise ValueError(f"query_vector {list(query_vector.shape)} and key_vector {list(key_vector.shape)} differ")
        for name, mask, x in (("query_mask", query_mask, query_vector), ("key_mask", key_mask, key_vector)):
            if mask.shape != x.shape[:2]:
                raise ValueError(f"{name} must be [batch*heads, seq_len] = {list(x.shape[:2])}, got {list(mask.shape)}")
        num_hash, hash_code_len = int(num_hash), int(hash_code_len)
        batch, _, dim = query_vector.shape
        diagonals = draw_diagonals(
            batch, dim, num_hash, hash_code_len, device=query_vector.device, dtype=query_vector.dtype
        )
        return (
            hadamard_codes(query_mask, query_vector, diagonals, num_hash, hash_code_len),
            hadamard_codes(key_mask, key_vector, diagonals, num_hash, hash_code_len),
        )

    def lsh_cumulation(
        self, query_mask, query_hash_code, key_mask, key_hash_code, value, hashtable_capacity, use_cuda=None, version=1
    ):
        return self._cumulate(query_mask, query_hash_code, key_mask, key_hash_code, value, hashtable_capacity)

    def lsh_weighted_cumulation(
        self,
        query_mask,
        query_hash_code,
        query_weight,
        key_mask,
        key_hash_code,
        key_weight,
        value,
        hashtable_capacity,
        use_cuda=None,
        version=1,
    ):
        import torch

        if query_weight.dim() != 3 or key_weight.dim() != 3 or query_weight.shape[-1] != key_weight.shape[-1]:
            raise ValueError(
                f"query_weight {list(query_weight.shape)} and key_weight {list(key_weight.shape)} must be "
                "[batch*heads, seq_len, weight_dim] with one weight_dim"
            )
        batch, n_key, value_dim = value.shape
        n_query, weight_dim = query_weight.shape[1], query_weight.shape[2]
        chunk = max(1, _MAX_WEIGHTED_COLUMNS // value_dim)
        out = torch.zeros(batch, n_query, value_dim, device=value.device, dtype=value.dtype)
        # sum_j c_ij (a_i . b_j) v_j = sum_w a_iw (sum_j c_ij b_jw v_j): one cumulation of b_j (x) v_j.
        for start in range(0, weight_dim, chunk):
            a = query_weight[..., start : start + chunk]
            b = key_weight[..., start : start + chunk]
            width = a.shape[-1]
            outer = (b[..., :, None] * value[..., None, :]).reshape(batch, n_key, width * value_dim)
            tables = self._cumulate(query_mask, query_hash_code, key_mask, key_hash_code, outer, hashtable_capacity)
            out += torch.einsum("bnw,bnwd->bnd", a, tables.reshape(batch, n_query, width, value_dim))
        return out

    def _cumulate(self, query_mask, query_codes, key_mask, key_codes, value, capacity):
        import torch

        hash_len = _hash_bits(capacity)
        _check_codes("query_hash_code", query_codes, "query_mask", query_mask, capacity)
        _check_codes("key_hash_code", key_codes, "key_mask", key_mask, capacity)
        if value.dim() != 3 or value.shape[:2] != key_codes.shape[:2]:
            raise ValueError(f"value must be [batch*heads, num_keys, dim] = {list(key_codes.shape[:2])} + [dim]")
        num_hash = query_codes.shape[-1]
        if key_codes.shape[-1] != num_hash:
            raise ValueError(f"query and key codes have {num_hash} and {key_codes.shape[-1]} hashes")
        dtype = value.dtype
        planes = torch.eye(num_hash * hash_len, device=value.device, dtype=dtype).reshape(
            num_hash, hash_len, num_hash * hash_len
        )
        with torch.no_grad():  # modeling_yoso calls these inside its own autograd.Function
            return yoso.attention(
                _encode(query_codes, hash_len, dtype),
                _encode(key_codes, hash_len, dtype),
                value,
                key_padding_mask=key_mask != 0,
                query_mask=query_mask != 0,
                num_hashes=num_hash,
                hash_bits=hash_len,
                mode="sample",
                hashing="gaussian",
                normalize=False,
                planes=planes,
            )

    def restore(self) -> None:
        """Put back what :func:`patch_yoso_model` replaced."""
        if self.module is None:
            return
        self.module.lsh_cumulation = self.previous
        if self.previous_hashing is not None:
            self.module.hashing = self.previous_hashing
        if self.previous_forward is not None:
            self.module.YosoSelfAttention.forward = self.previous_forward


def _calls_on_lsh_cumulation(module) -> dict[str, list[int]]:
    """``{method: [positional arg counts]}`` of every ``lsh_cumulation.<method>(...)`` call in ``module``."""
    found: dict[str, list[int]] = {}
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "lsh_cumulation"
        ):
            found.setdefault(node.func.attr, []).append(len(node.args) + len(node.keywords))
    return found


def _check_module(module, fix_hashing: bool) -> None:
    where = getattr(module, "__name__", repr(module))
    try:
        import transformers

        where += f" (transformers {transformers.__version__})"
    except ImportError:  # pragma: no cover
        pass
    expected = ", ".join(f"lsh_cumulation.{name}() with {n} arguments" for name, n in EXPECTED_CALLS.items())
    problems = []
    if not hasattr(module, "lsh_cumulation"):
        problems.append("no module-level `lsh_cumulation` object")
    try:
        calls = _calls_on_lsh_cumulation(module)
    except (OSError, TypeError, SyntaxError):
        calls = None
        problems.append("its source cannot be read to check the calls")
    if calls is not None:
        for name, counts in sorted(calls.items()):
            if name not in EXPECTED_CALLS:
                problems.append(f"it calls lsh_cumulation.{name}(), which yoso does not provide")
            elif any(c != EXPECTED_CALLS[name] for c in counts):
                problems.append(f"it calls lsh_cumulation.{name}() with {sorted(set(counts))} arguments")
        if not calls:
            problems.append("it never calls lsh_cumulation.<kernel>()")
    if fix_hashing:
        hashing = getattr(module, "hashing", None)
        if hashing is None or list(inspect.signature(hashing).parameters) != ["query", "key", "num_hash", "hash_len"]:
            problems.append("no `hashing(query, key, num_hash, hash_len)` function (pass fix_hashing=False)")
    if problems:
        raise RuntimeError(
            f"patch_yoso_model() supports transformers' YOSO module that calls {expected}; {where} differs: "
            + "; ".join(problems)
        )


def patch_yoso_model(*, fix_hashing: bool = True, module=None) -> YosoKernels:
    """Install :class:`YosoKernels` as ``modeling_yoso.lsh_cumulation`` so ``YosoModel`` runs on yoso.

    Args:
        fix_hashing: also replace ``modeling_yoso.hashing`` (the ``use_fast_hash=False`` path), which upstream
            hashes the keys twice and never the queries (see the module docstring).
        module: the module to patch; default ``transformers.models.yoso.modeling_yoso``.

    Returns the installed kernels; ``.restore()`` undoes the patch. Raises ``RuntimeError`` naming the
    difference if the module does not call the kernels the way this integration expects. Also makes padding
    exact by handing ``YosoSelfAttention`` its mask as ``(mask - 1) * 1e4``, except in YOSO-C models
    (``conv_window`` set), where upstream's padding leak remains (module docstring).
    """
    if module is None:
        try:
            from transformers.models.yoso import modeling_yoso as module
        except ImportError as error:
            raise ImportError(
                "patch_yoso_model() needs transformers with its YOSO model (pip install transformers)"
            ) from error
    _check_module(module, fix_hashing)
    current = module.lsh_cumulation
    if isinstance(current, YosoKernels):  # patched before: keep what was there originally
        current.restore()
        current = module.lsh_cumulation
    attention = getattr(module, "YosoSelfAttention", None)
    forward = None if attention is None else attention.forward
    kernels = YosoKernels(module, current, module.hashing if fix_hashing else None, forward)
    module.lsh_cumulation = kernels
    if fix_hashing:
        module.hashing = gaussian_hashing
    if forward is not None:  # exact padding (module docstring); absent in stand-in modules of tests
        attention.forward = _exact_padding_forward(forward)
    return kernels
