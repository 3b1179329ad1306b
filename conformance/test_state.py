"""API level: causal YOSO-m as a recurrent model (docs/math.md#recurrent-state).

A sequence cut into chunks -- random boundaries, chunks of one token, a prefill followed by token-by-token
decoding -- and run call after call carrying the state gives the one-shot causal call's output and, with
the key tables (``differentiable_state=True``), its gradients; packed sequences (``cu_seqlens``) give
separate calls' results; on every backend with bucket tables, through every framework it serves. Backends
without them refuse clearly. Shapes are tiny: these run per backend and framework, Pallas interpreted.
"""

from __future__ import annotations

import numpy as np
import pytest

import yoso
import yoso_reference as ref
from harness import assert_close, random_mask, to_numpy, unit, untied
from harness import planes as draw_planes

M, TAU = 3, 3
# A chunked call sums in another order than the one-shot call: allow a few float32 roundings more.
FACTOR = 4.0


@pytest.fixture
def state_target(target):
    if not target.backend.has_tables:
        pytest.skip(f"the {target.name!r} backend has no bucket tables (has_tables is False)")
    return target


def _rows(rng, planes, lead, n, dim):
    """Tie-free rows ``lead + [n, dim]`` for canonical planes ``[P, ...]`` (P = 1 or prod(lead))."""
    batch = int(np.prod(lead))
    rows = [untied(rng, (1, n, dim), planes[b % len(planes)][None], "gaussian") for b in range(batch)]
    return np.concatenate(rows).reshape(lead + (n, dim))


def _problem(rng, lead=(2,), n=11, dim=5, value_dim=4, per_row_planes=False, planes=None):
    batch = int(np.prod(lead))
    shared = draw_planes(rng, M, TAU, dim) if planes is None else planes
    planes = np.stack([draw_planes(rng, M, TAU, dim) for _ in range(batch)]) if per_row_planes else shared[None]
    q, k = _rows(rng, planes, lead, n, dim), _rows(rng, planes, lead, n, dim)
    return dict(
        q=q,
        k=k,
        v=rng.standard_normal(lead + (n, value_dim)),
        cot=rng.standard_normal(lead + (n, value_dim)),
        key_padding_mask=random_mask(rng, lead + (n,)),
        query_mask=random_mask(rng, lead + (n,), keep=0.8),
        planes=planes.reshape(lead + planes.shape[1:]) if per_row_planes else shared,
        canonical_planes=planes,
        lead=lead,
    )


def _flat(x, lead):
    return x.reshape((-1,) + x.shape[len(lead) :])


def _oracle(pb, extra_table_cotangent=None, causal=True):
    """``(out, (dq, dk, dv), final tables)`` of the one-shot call (causal by default), by the float64 oracle."""
    lead = pb["lead"]
    q, k, v, cot, kpm, qm = (_flat(pb[n], lead) for n in ("q", "k", "v", "cot", "key_padding_mask", "query_mask"))
    out, grads = ref.attention_and_grads(
        q,
        k,
        v,
        cot,
        planes=pb["canonical_planes"],
        key_padding_mask=kpm,
        query_mask=qm,
        causal=causal,
        num_hashes=M,
        hash_bits=TAU,
        max_ratio=yoso.testing.max_ratio(TAU),
    )
    k_codes = ref.hash_codes(unit(np.where(kpm[..., None], k, 0)), pb["canonical_planes"], **_hashing())
    tables = ref.bucket_tables(k_codes, np.where(kpm[..., None], v, 0), mask=kpm, hash_bits=TAU)
    grads = list(grads)
    if extra_table_cotangent is not None:
        # d/dv_j of sum(tables * W) is sum_s W[s, h_s(k_j)] for unmasked keys.
        w = _flat(extra_table_cotangent, lead)
        picked = w[np.arange(w.shape[0])[:, None, None], np.arange(M)[None, :, None], k_codes]  # [B, m, N, Dv]
        grads[2] = grads[2] + np.where(kpm[..., None], picked.sum(axis=1), 0)
    back = [g.reshape(lead + g.shape[1:]) for g in grads]
    return out.reshape(lead + out.shape[1:]), back, tables.reshape(lead + tables.shape[1:])


def _hashing():
    return dict(hashing="gaussian", num_hashes=M, hash_bits=TAU)


def _random_bounds(rng, n):
    """Chunk boundaries: a first chunk of one token, a random cut followed by another one-token chunk."""
    cut = int(rng.integers(3, n - 2))
    return [0, 1, cut, cut + 1, n]


CHUNKINGS = {
    "random": _random_bounds,
    "prefill-then-decode": lambda rng, n: [0, n - 3, n - 2, n - 1, n],
}


def _chunk_kwargs(pb, a, b, index, kwargs):
    kw = dict(
        key_padding_mask=pb["key_padding_mask"][..., a:b],
        query_mask=pb["query_mask"][..., a:b],
        causal=True,
        **kwargs,
    )
    if index == 0 or index == 2:  # later chunks take the state's hash functions; passing them again is allowed
        kw["planes"] = pb["planes"]
    return kw


def _run_chunks(target, pb, bounds, *, grads=False, table_cotangent=None, **kwargs):
    """``(out, (dq, dk, dv) or None, final state)`` of the chunks in ``target``'s framework, carrying the state;
    gradients of ``sum(out * cot) + sum(final tables * table_cotangent)`` through the framework's autograd."""
    chunks = list(zip(bounds[:-1], bounds[1:]))
    options = dict(num_hashes=M, hash_bits=TAU, output_final_state=True, **kwargs)
    arr = target.array
    with yoso.set_backend(target.name):
        if target.framework == "numpy":
            state, outs, vjps = None, [], []
            for i, (a, b) in enumerate(chunks):
                call = yoso.attention_vjp if grads else yoso.attention
                kw = _chunk_kwargs(pb, a, b, i, options)
                result = call(*(arr(pb[n][..., a:b, :]) for n in "qkv"), initial_state=state, **kw)
                (out, state), vjp = result if grads else (result, None)
                outs.append(to_numpy(out))
                vjps.append(vjp)
            if not grads:
                return np.concatenate(outs, -2), None, state
            d_state = None
            if table_cotangent is not None:
                d_state = yoso.State(tables=table_cotangent, planes=None)
            pieces = []
            for (a, b), vjp in reversed(list(zip(chunks, vjps))):
                back = vjp((pb["cot"][..., a:b, :].astype(target.dtype), d_state))
                pieces.insert(0, back[:3])
                d_state = back[3] if len(back) > 3 else None
            return np.concatenate(outs, -2), [np.concatenate([p[i] for p in pieces], -2) for i in range(3)], state
        if target.framework == "torch":
            import torch

            inputs = [arr(pb[n]).requires_grad_(grads) for n in "qkv"]
            state, outs, loss = None, [], 0
            for i, (a, b) in enumerate(chunks):
                kw = _chunk_kwargs(pb, a, b, i, options)
                kw = {n: arr(x) if n.endswith("mask") else x for n, x in kw.items()}
                out, state = yoso.attention(*(x[..., a:b, :] for x in inputs), initial_state=state, **kw)
                outs.append(out)
                loss = loss + (out * arr(pb["cot"][..., a:b, :])).sum()
            if not grads:
                return np.concatenate([to_numpy(o) for o in outs], -2), None, state
            if table_cotangent is not None:
                loss = loss + (state.tables * torch.as_tensor(table_cotangent, dtype=state.tables.dtype)).sum()
            loss.backward()
            return to_numpy(torch.cat(outs, -2)), [to_numpy(x.grad) for x in inputs], state
        import jax
        import jax.numpy as jnp

        def run(q, k, v):
            state, outs, loss = None, [], 0
            for i, (a, b) in enumerate(chunks):
                kw = _chunk_kwargs(pb, a, b, i, options)
                out, state = yoso.attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], initial_state=state, **kw)
                outs.append(out)
                loss = loss + jnp.sum(out * jnp.asarray(pb["cot"][..., a:b, :], out.dtype))
            if table_cotangent is not None:
                loss = loss + jnp.sum(state.tables * jnp.asarray(table_cotangent, state.tables.dtype))
            return loss, (jnp.concatenate(outs, -2), state)

        # Under jax.jit, as a training step runs (one compilation for the whole chain, not one per chunk).
        inputs = [arr(pb[n]) for n in "qkv"]
        if not grads:
            _, (out, state) = jax.jit(run)(*inputs)
            return to_numpy(out), None, state
        back, (out, state) = jax.jit(jax.grad(run, argnums=(0, 1, 2), has_aux=True))(*inputs)
        return to_numpy(out), [to_numpy(g) for g in back], state


@pytest.mark.parametrize(
    "chunking, per_row_planes", [("random", False), ("prefill-then-decode", True)], ids=["random", "decode-per-row"]
)
def test_chunks_equal_the_one_shot_call(state_target, rng, chunking, per_row_planes):
    """Output and final tables of a chunked causal sequence (key padding inside it) equal the one-shot call's."""
    pb = _problem(rng, per_row_planes=per_row_planes)
    bounds = CHUNKINGS[chunking](rng, pb["q"].shape[-2])
    out, _, state = _run_chunks(state_target, pb, bounds)
    want_out, _, want_tables = _oracle(pb)
    dtype = state_target.dtype
    assert_close(out, want_out, dtype, "chunked output", factor=FACTOR)
    assert (out[~pb["query_mask"]] == 0).all(), "masked query rows must be exact zeros"
    assert_close(to_numpy(state.tables), want_tables, dtype, "final tables", factor=FACTOR)
    assert state.key_tables is None, "key tables are carried only with differentiable_state=True"


def test_chunked_gradients_equal_the_one_shot_call(state_target, rng):
    """With key tables, gradients w.r.t. every chunk's q, k, v -- and through the final state's tables --
    equal the one-shot call's (the lower bound's terms between chunks included); random chunks, two of one
    token."""
    pb = _problem(rng)
    bounds = _random_bounds(rng, pb["q"].shape[-2])
    table_cotangent = rng.standard_normal(pb["lead"] + (M, 2**TAU, pb["v"].shape[-1]))
    out, grads, state = _run_chunks(
        state_target, pb, bounds, grads=True, differentiable_state=True, table_cotangent=table_cotangent
    )
    want_out, want_grads, _ = _oracle(pb, extra_table_cotangent=table_cotangent)
    dtype = state_target.dtype
    assert_close(out, want_out, dtype, "chunked output", factor=FACTOR)
    for name, got, want in zip("qkv", grads, want_grads):
        assert_close(got, want, dtype, f"d{name}", factor=FACTOR)
    assert tuple(state.key_tables.shape) == pb["lead"] + (M, 2**TAU, pb["v"].shape[-1], pb["q"].shape[-1])


def _state_without_key_tables(target, pb, n):
    with yoso.set_backend(target.name):
        _, state = yoso.attention(
            *(target.array(pb[x][..., :n, :]) for x in "qkv"),
            causal=True,
            num_hashes=M,
            hash_bits=TAU,
            planes=pb["planes"],
            output_final_state=True,
        )
    return state


def test_gradients_through_a_state_without_key_tables_are_refused(state_target, rng):
    """Continuing a state without key tables, gradients w.r.t. q and k would silently miss the terms with
    earlier chunks: refused (torch and NumPy at the call, JAX when the backward is traced); the same call
    without gradients runs. (``backward="exact"``, which has no table form, is refused likewise:
    packages/yoso-api/tests/test_recurrent.py.)"""
    pb = _problem(rng)
    state = _state_without_key_tables(state_target, pb, 4)
    chunk = [pb[x][..., 4:7, :] for x in "qkv"]
    kw = dict(causal=True, num_hashes=M, hash_bits=TAU)
    message = "key tables"
    arr = state_target.array
    with yoso.set_backend(state_target.name):
        forward = yoso.attention(*(arr(x) for x in chunk), initial_state=state, **kw)
        assert np.isfinite(to_numpy(forward)).all()
        if state_target.framework == "numpy":
            with pytest.raises(ValueError, match=message):
                yoso.attention_vjp(*(arr(x) for x in chunk), initial_state=state, **kw)
        elif state_target.framework == "torch":
            q = arr(chunk[0]).requires_grad_(True)
            with pytest.raises(ValueError, match=message):
                yoso.attention(q, arr(chunk[1]), arr(chunk[2]), initial_state=state, **kw)
        else:
            import jax

            def loss(q):
                return yoso.attention(q, arr(chunk[1]), arr(chunk[2]), initial_state=state, **kw).sum()

            with pytest.raises(ValueError, match=message):
                jax.grad(loss)(arr(chunk[0]))


CU_SEQLENS = [0, 4, 5, 5, 12]  # lengths 4, 1, 0 (an empty sequence) and 7


def _packed_problem(rng, heads=2):
    return _problem(rng, lead=(1, heads), n=CU_SEQLENS[-1])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_sequences_equal_separate_calls(state_target, rng, causal):
    """With ``cu_seqlens`` each packed sequence attends only within itself: outputs and gradients equal one
    call per sequence (with key padding inside the sequences)."""
    pb = _packed_problem(rng)
    kw = dict(causal=causal, num_hashes=M, hash_bits=TAU, planes=pb["planes"])
    masks = {n: pb[n] for n in ("key_padding_mask", "query_mask")}
    if state_target.framework == "jax":  # under jax.jit: one compilation
        import jax

        def loss(q, k, v):
            out = yoso.attention(q, k, v, cu_seqlens=np.asarray(CU_SEQLENS), **masks, **kw)
            return (out * pb["cot"]).sum(), out

        with yoso.set_backend(state_target.name):
            inputs = [state_target.array(pb[n]) for n in "qkv"]
            grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*inputs)
        out, grads = to_numpy(out), [to_numpy(g) for g in grads]
    else:
        out, grads = state_target.attention_and_grads(
            pb["q"], pb["k"], pb["v"], pb["cot"], cu_seqlens=np.asarray(CU_SEQLENS), **masks, **kw
        )
    want, want_grads = np.zeros_like(out), [np.zeros_like(g) for g in grads]
    for a, b in zip(CU_SEQLENS[:-1], CU_SEQLENS[1:]):
        if a == b:
            continue
        part = {**pb, **{n: pb[n][..., a:b, :] for n in ("q", "k", "v", "cot")}}
        part.update({n: m[..., a:b] for n, m in masks.items()})
        got, got_grads, _ = _oracle(part, causal=causal)
        want[..., a:b, :] = got
        for whole, piece in zip(want_grads, got_grads):
            whole[..., a:b, :] = piece
    dtype = state_target.dtype
    assert_close(out, want, dtype, "packed output")
    for name, got, expected in zip("qkv", grads, want_grads):
        assert_close(got, expected, dtype, f"packed d{name}")


def test_packed_state_has_one_entry_per_sequence(state_target, rng):
    """Packed prefill returns one state per sequence (an empty sequence's is zero); a packed decoding step (one
    token each) continues each sequence as the one-shot call over that sequence and its new token."""
    pb = _packed_problem(rng)
    extra = _problem(rng, lead=(1, 2), n=4, planes=pb["planes"])  # one new token for each of the 4 sequences
    kw = dict(causal=True, num_hashes=M, hash_bits=TAU)
    arr = state_target.array
    with yoso.set_backend(state_target.name):
        _, state = yoso.attention(
            *(arr(pb[n]) for n in "qkv"),
            cu_seqlens=CU_SEQLENS,  # no mask: the padding of the shorter sequences must not reach their tables
            planes=pb["planes"],
            output_final_state=True,
            **kw,
        )
        assert tuple(state.tables.shape) == (4, 2, M, 2**TAU, pb["v"].shape[-1])
        step, _ = yoso.attention(
            *(arr(extra[n]) for n in "qkv"),
            cu_seqlens=np.arange(5),
            initial_state=state,
            output_final_state=True,
            **kw,
        )
    want = np.zeros_like(to_numpy(step))
    for s, (a, b) in enumerate(zip(CU_SEQLENS[:-1], CU_SEQLENS[1:])):
        joined = {n: np.concatenate([pb[n][..., a:b, :], extra[n][..., s : s + 1, :]], -2) for n in "qkv"}
        joined["cot"] = np.zeros_like(joined["v"])
        joined["key_padding_mask"] = joined["query_mask"] = np.ones((1, 2, b - a + 1), bool)
        want[..., s : s + 1, :] = _oracle({**pb, **joined})[0][..., -1:, :]
    assert_close(to_numpy(step), want, state_target.dtype, "packed decoding step", factor=FACTOR)


def test_state_size_does_not_depend_on_the_sequence_length(state_target, rng):
    """m * 2**tau * Dv numbers per head, whatever N: the state of 3 tokens and of 30 have the same size."""
    sizes = set()
    for n in (3, 30):
        pb = _problem(rng, n=n)
        state = _state_without_key_tables(state_target, pb, n)
        sizes.add((tuple(state.tables.shape), np.dtype(str(state.tables.dtype).removeprefix("torch.")).itemsize))
    assert sizes == {((2, M, 2**TAU, 4), 8 if state_target.dtype == "float64" else 4)}, sizes


def test_add_to_tables_matches_the_oracle(kernel, rng):
    """Kernel level: ``add_to_tables(T, codes, v)`` is ``T + bucket_tables(codes, v)``, plain and with outer
    products (the one primitive a decoding step writes with)."""
    if not kernel.backend.has_tables:
        pytest.skip(f"the {kernel.name!r} backend has no bucket tables (has_tables is False)")
    batch, m, tau, n, channels, outer = 2, 3, 4, 5, 3, 2
    codes = rng.integers(0, 2**tau, (batch, m, n))
    values = rng.standard_normal((batch, n, channels))
    others = rng.standard_normal((batch, n, outer))
    mask = random_mask(rng, (batch, n))
    for extra in (None, others):
        shape = (batch, m, 2**tau, channels) + (() if extra is None else (outer,))
        tables = rng.standard_normal(shape)
        got = kernel.backend.add_to_tables(
            kernel.array(tables),
            kernel.array(codes),
            kernel.array(values),
            mask=kernel.array(mask),
            hash_bits=tau,
            outer=kernel.array(extra),
        )
        want = tables + ref.bucket_tables(codes, values, mask=mask, hash_bits=tau, outer=extra)
        assert_close(to_numpy(got), want, kernel.dtype, "add_to_tables")


def test_backends_without_tables_refuse_state_calls(target, rng):
    """A backend without bucket-table primitives says so when asked for a state (explicit choice is strict)."""
    if target.backend.has_tables:
        pytest.skip(f"the {target.name!r} backend has bucket tables")
    pb = _problem(rng)
    with pytest.raises(ValueError, match="bucket-table access"):
        target.attention(pb["q"], pb["k"], pb["v"], causal=True, output_final_state=True, num_hashes=M, hash_bits=TAU)


def test_torch_compile_carries_the_state(torch_target, rng):
    """``yoso::core_state`` has fake implementations: a chunk continuing a state traces with
    ``torch.compile(fullgraph=True)`` and equals the eager call."""
    import torch

    if not torch_target.backend.has_tables:
        pytest.skip(f"the {torch_target.name!r} backend has no bucket tables (has_tables is False)")
    pb = _problem(rng, n=6)
    q, k, v = (torch_target.array(pb[n]) for n in "qkv")
    kw = dict(causal=True, num_hashes=M, hash_bits=TAU, output_final_state=True)

    def chunk(q, k, v, state):
        return yoso.attention(q, k, v, initial_state=state, **kw)

    with yoso.set_backend(torch_target.name):
        _, state = yoso.attention(q[..., :3, :], k[..., :3, :], v[..., :3, :], planes=pb["planes"], **kw)
        eager, eager_state = chunk(q[..., 3:, :], k[..., 3:, :], v[..., 3:, :], state)
        compiled, compiled_state = torch.compile(chunk, backend="aot_eager", fullgraph=True)(
            q[..., 3:, :], k[..., 3:, :], v[..., 3:, :], state
        )
    assert_close(to_numpy(compiled), to_numpy(eager), torch_target.dtype, "compiled chunk")
    assert_close(to_numpy(compiled_state.tables), to_numpy(eager_state.tables), torch_target.dtype, "compiled state")


def test_torch_opcheck_of_the_state_op(torch_target, rng):
    """``torch.library.opcheck`` of ``yoso::core_state``: schema, fake tensors, autograd registration (through
    ``torch.ops.yoso``, registered by the first torch call, as test_torch.py does for ``yoso::core``)."""
    import torch

    if not torch_target.backend.has_tables:
        pytest.skip(f"the {torch_target.name!r} backend has no bucket tables (has_tables is False)")
    batch, n, dim, value_dim = 2, 5, 4, 3
    arr = torch_target.array
    q, k = (arr(unit(rng.standard_normal((batch, n, dim)))).requires_grad_(True) for _ in "qk")
    v = arr(rng.standard_normal((batch, n, value_dim))).requires_grad_(True)
    tables = arr(rng.standard_normal((batch, M, 2**TAU, value_dim))).requires_grad_(True)
    key_tables = arr(rng.standard_normal((batch, M, 2**TAU, value_dim, dim))).requires_grad_(True)
    planes = arr(draw_planes(rng, M, TAU, dim)[None])
    args = (q, k, v, planes, None, None, tables, key_tables, torch_target.name, "gaussian", M, TAU, "lower_bound", True)
    with yoso.set_backend(torch_target.name):  # the first torch call registers the ops
        yoso.attention(q.detach(), k.detach(), v.detach(), num_hashes=M, hash_bits=TAU, planes=planes[0])
    torch.library.opcheck(
        torch.ops.yoso.core_state.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
