"""NumPy arrays and CPU torch tensors computed by a backend that computes on JAX arrays (``jax``).

The caller's glue keeps its own normalisations and autograd; the YOSO core runs as one compiled program per
direction (``yoso._jax_glue.core_forward`` and the others). The arrays go over without a copy where it
matters (DLPack), padded to :func:`bucketed` sizes -- padded rows masked, results cut back -- so that
workloads whose shapes change every call (dynamic padding in fine-tuning) reuse a few compiled programs
instead of compiling one per shape (docs/architecture.md#serving-other-frameworks).

Every function takes the caller framework's ``full(like, shape, value)`` (a new array on ``like``'s device,
of ``like``'s dtype, bool for a bool ``value``) and ``back(jax_array)`` (a result as the caller's array).
This module imports JAX only when called: only a backend computing on JAX arrays leads here.
"""

from __future__ import annotations


def bucketed(n: int, least: int = 16) -> int:
    """``n`` rounded up to one of four sizes per octave (``least`` at least): at most 19% padding.

    Serving NumPy arrays and torch tensors through a jit-compiling backend, the glue pads batch and
    sequence lengths to these sizes (padded rows masked), so that workloads whose shapes change every
    call -- dynamic padding in fine-tuning -- reuse a few compiled programs instead of compiling one per
    shape (docs/architecture.md#serving-other-frameworks).
    """
    if n <= least:
        return least
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return -(-n // step) * step


class Padding:
    """Canonical arrays padded to :func:`bucketed` sizes, in any framework whose arrays slice like NumPy's.

    Padded rows are masked out -- queries and keys alike -- so the results are those of the unpadded
    call. ``full(like, shape, value)`` makes a new array on ``like``'s device, of ``like``'s dtype (bool
    for a bool ``value``).
    """

    QUERIES, KEYS = 1, 2

    def __init__(self, batch: int, n_query: int, n_key: int, *, full):
        self.sizes = (batch, n_query, n_key)
        # The batch from 1 (a floor of 16 would double the work of B*H = 8), the tokens from 16.
        self.padded = (bucketed(batch, least=1), bucketed(n_query), bucketed(n_key))
        self._full = full

    def _grow(self, x, shape, value, index):
        if tuple(x.shape) == tuple(shape):
            return x
        out = self._full(x, shape, value)
        out[index] = x
        return out

    def rows(self, x, which: int, value=0):
        """``x [B, N, ...]`` padded along the batch and along ``N`` of kind ``which`` (QUERIES or KEYS)."""
        if x is None:
            return None
        shape = (self.padded[0], self.padded[which]) + tuple(x.shape[2:])
        return self._grow(x, shape, value, (slice(0, x.shape[0]), slice(0, x.shape[1])))

    def qkv(self, q, k, v):
        """``(q, k, v)`` padded: the queries' rows as QUERIES, the keys' and values' as KEYS."""
        return self.rows(q, self.QUERIES), self.rows(k, self.KEYS), self.rows(v, self.KEYS)

    def mask(self, mask, which: int, like):
        """A ``[B, N]`` mask (None: all kept) padded with False, or None if nothing is padded or masked."""
        if mask is None and self.padded[0] == self.sizes[0] and self.padded[which] == self.sizes[which]:
            return None
        if mask is None:
            mask = self._full(like, (self.sizes[0], self.sizes[which]), True)
        return self.rows(mask, which, value=False)

    def codes(self, codes, which: int):
        """Codes ``[B, m, N]``, padded along the batch and their last axis (the tokens there are masked)."""
        shape = (self.padded[0], codes.shape[1], self.padded[which])
        return self._grow(codes, shape, 0, (slice(0, codes.shape[0]), slice(None), slice(0, codes.shape[2])))

    def planes(self, planes):
        """Per-row planes ``[B, ...]`` get rows of ones for the padded batch rows (valid hash functions of
        either family; those rows are masked)."""
        if planes is None or planes.shape[0] == 1 or self.padded[0] == self.sizes[0]:
            return planes
        return self._grow(planes, (self.padded[0],) + tuple(planes.shape[1:]), 1, slice(0, self.sizes[0]))

    def cut(self, x, which: int, axis: int = 1):
        """The unpadded part of a result: batch rows, and ``N`` of kind ``which`` along ``axis``."""
        index = [slice(0, self.sizes[0])] + [slice(None)] * (axis - 1) + [slice(0, self.sizes[which])]
        return x[tuple(index)]


def pad_tokens(x, n: int, full, value=0):
    """``x [B, N, ...]`` (or None) grown along ``N`` to ``n`` tokens holding ``value``.

    Serving a jit-compiling backend, a stateful call pads only the tokens to :func:`bucketed` sizes: its
    batch is fixed by the state, and a decoding loop repeats one shape anyway.
    """
    if x is None:
        return None
    if x.shape[1] == n:
        return x
    out = full(x, (x.shape[0], n) + tuple(x.shape[2:]), value)
    out[:, : x.shape[1]] = x
    return out


def pad_token_mask(mask, like, n: int, full):
    """A ``[B, N]`` mask (None: all kept) padded with False to ``n`` tokens; None when nothing is padded."""
    if like.shape[1] == n:
        return mask
    if mask is None:
        mask = full(like, (like.shape[0], like.shape[1]), True)
    return pad_tokens(mask, n, full, False)


def forward(backend, q, k, v, planes, query_mask, key_mask, *, full, back, mode, **options):
    """:func:`yoso._core.forward`: ``(Y, codes)``, the codes ``(q_codes, k_codes)`` int32 ``[B, m, N]`` or None."""
    from . import _jax_glue as jg

    pad = Padding(q.shape[0], q.shape[1], k.shape[1], full=full)
    arrays = (
        *pad.qkv(q, k, v),
        pad.planes(planes),
        pad.mask(query_mask, pad.QUERIES, q),
        pad.mask(key_mask, pad.KEYS, q),
    )
    # The forward ignores the estimator: one program serves both.
    config = jg.core_config(backend.name, mode=mode, backward="lower_bound", **options)
    y, q_codes, k_codes = (back(a) for a in jg.in_row_parts(jg.core_forward, arrays, config=config))
    if mode == "expectation":
        return pad.cut(y, pad.QUERIES), None
    # Cut, as the caller's codes are (the backward pads them again).
    return pad.cut(y, pad.QUERIES), (pad.cut(q_codes, pad.QUERIES, axis=2), pad.cut(k_codes, pad.KEYS, axis=2))


def backward(backend, q, k, v, codes, query_mask, key_mask, grad, *, full, back, mode, backward, hash_bits, causal):
    """:func:`yoso._core.backward`: ``(dq, dk, dv)`` of :func:`forward`'s ``Y`` for the output gradient ``grad``."""
    from . import _jax_glue as jg

    pad = Padding(q.shape[0], q.shape[1], k.shape[1], full=full)
    codes = codes or (None, None)  # none in expectation mode
    arrays = (
        pad.rows(grad, pad.QUERIES),
        *pad.qkv(q, k, v),
        *(None if c is None else pad.codes(c, which) for c, which in zip(codes, (pad.QUERIES, pad.KEYS))),
        pad.mask(query_mask, pad.QUERIES, q),
        pad.mask(key_mask, pad.KEYS, q),
    )
    config = jg.core_config(backend.name, mode, "gaussian", 0, hash_bits, causal, backward)
    dq, dk, dv = (back(a) for a in jg.in_row_parts(jg.core_backward, arrays, config=config))
    return pad.cut(dq, pad.QUERIES), pad.cut(dk, pad.KEYS), pad.cut(dv, pad.KEYS)


def forward_state(backend, q, k, v, planes, query_mask, key_mask, tables, key_tables, *, full, back, **options):
    """:func:`yoso._core.forward_state`: ``(Y, tables', key_tables', codes)``. Only the tokens are padded
    (:func:`pad_tokens`); the codes come back padded, as :func:`backward_state` takes them."""
    from . import _jax_glue as jg

    n, padded = q.shape[1], bucketed(q.shape[1])
    arrays = (
        *(pad_tokens(x, padded, full) for x in (q, k, v)),
        planes,
        pad_token_mask(query_mask, q, padded, full),
        pad_token_mask(key_mask, q, padded, full),
        tables,
        key_tables,
    )
    config = jg.state_config(
        backend.name,
        options["hashing"],
        options["num_hashes"],
        options["hash_bits"],
        "lower_bound",  # the forward ignores the estimator
        has_tables=tables is not None,
        has_key_tables=key_tables is not None,
        key_tables_out=options["with_key_tables"],
    )
    results = jg.core_forward_state(*map(jg.from_host, arrays), config=config)
    y, q_codes, k_codes, new_tables, new_key_tables = (None if a is None else back(a) for a in results)
    return y[:, :n], new_tables, new_key_tables, (q_codes, k_codes)


def backward_state(
    backend, q, k, v, codes, query_mask, key_mask, grad, *tables, full, back, has_tables, backward, hash_bits
):
    """:func:`yoso._core.backward_state`: ``(dq, dk, dv, d_tables, d_key_tables)`` of :func:`forward_state`
    (None where absent); ``tables`` are ``grad_tables, grad_key_tables, key_tables``."""
    from . import _jax_glue as jg

    grad_tables, grad_key_tables, key_tables = tables
    n, padded = q.shape[1], codes[0].shape[2]
    arrays = (
        pad_tokens(grad, padded, full),
        grad_tables,
        grad_key_tables,
        *(pad_tokens(x, padded, full) for x in (q, k, v)),
        *codes,
        pad_token_mask(query_mask, q, padded, full),
        pad_token_mask(key_mask, q, padded, full),
        key_tables,
    )
    config = jg.state_config(
        backend.name,
        "gaussian",
        0,
        hash_bits,
        backward,
        has_tables=has_tables,
        has_key_tables=key_tables is not None,
        key_tables_out=grad_key_tables is not None,
    )
    grads = jg.core_backward_state(*map(jg.from_host, arrays), config=config)
    dq, dk, dv, d_tables, d_key_tables = (None if g is None else back(g) for g in grads)
    return dq[:, :n], dk[:, :n], dv[:, :n], d_tables, d_key_tables
