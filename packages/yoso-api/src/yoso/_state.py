"""The recurrent state of causal YOSO-m: what ``yoso.attention(..., output_final_state=True)`` returns.

A plain NamedTuple of arrays of the caller's framework, so that JAX treats it as a pytree (``jax.jit``,
``jax.lax.scan`` carry it; its structure is static: ``key_tables`` is either always an array or always None
along a scan) and torch autograd flows through its tensors (truncated backpropagation through time:
``state = yoso.State(*(None if t is None else t.detach() for t in state))``). The math is in
docs/math.md#recurrent-state.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class State(NamedTuple):
    """Bucket tables of every key seen so far, and the hash functions they were built with.

    Attributes:
        tables: ``[..., m, 2**tau, Dv]``, ``tables[..., s, c, :]`` the sum of the values of the (unmasked)
            keys whose hash ``s`` is ``c`` -- no ``1/m``: tables of consecutive chunks add up. The leading
            dims are the call's (broadcast) leading dims, one entry per sequence with ``cu_seqlens``. In the
            accumulation dtype (float32; float64 for float64 inputs), whatever the inputs' dtype.
        planes: the hash functions (the ``planes=`` layout, with the leading dims they were given with).
            A call continuing the state hashes with these.
        key_tables: ``[..., m, 2**tau, Dv, D]`` sums of ``v_j (x) k_j / ||k_j||`` per bucket, or None. Only
            the lower-bound gradient w.r.t. q and k across chunks needs them; they are ``D`` times larger than
            ``tables`` and carried only when a call asks (``differentiable_state=True``).
    """

    tables: Any
    planes: Any
    key_tables: Any = None
