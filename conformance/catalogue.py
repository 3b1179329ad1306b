"""The adversarial catalogue: bad and borderline inputs, and what each must give. Data only.

Every case names its inputs (a function of a :class:`Draw`: NumPy arrays and plain values, or framework
objects built for the caller framework at hand) and its expectation:

* :class:`Raises` -- this exception type, with a message that names ``argument`` (and matches ``match``),
  raised before anything is computed (``computed=True``: once the output exists, so not by
  ``yoso.backend_for``, which computes nothing);
* :class:`Holds` -- a property of the result (checked by ``test_catalogue.py``: ``run_holds`` and
  ``test_layer_case``): ``finite`` (output and gradients), ``unit_rows`` (every output row of N-YOSO-E has
  norm 1), ``directions`` (close to the result of ``reference``, the inputs before rescaling),
  ``masked_twin`` (bitwise the result of ``reference``, the inputs with the zero rows masked instead),
  ``same_as`` (bitwise the result of ``reference``), ``warns`` (a UserWarning, and a finite result),
  ``codes_in_range`` and ``zero_row_code_0`` (hash codes), ``planes_layout`` (``yoso.hash_planes``),
  ``no_leak`` (layers: padded tokens' content cannot change real tokens' outputs).

Four lists, one per kind of front end: ``QKV`` (``yoso.attention``, its gradients, ``yoso.backend_for``),
``ROWS`` (``yoso.hash_codes``), ``PLANES`` (``yoso.hash_planes``), ``LAYERS`` (the model layers). Layer cases
use generic roles (``width``, ``heads``, ``input``, ``mask``, ``dropout``) that each layer's front end maps
to its own argument names. Shapes are tiny and few, so that the Triton interpreter and JAX's compiler get
through the catalogue in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import yoso
from harness import planes as draw_planes
from harness import untied

# ---- what a case expects -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Raises:
    error: type
    argument: str  # the message must name it (as a word)
    match: str = ""  # and match this, if given
    computed: bool = False  # raised once the output is computed (yoso.backend_for raises nothing)


@dataclass(frozen=True)
class Holds:
    prop: str  # one of the properties of the module docstring


@dataclass(frozen=True)
class Case:
    id: str
    inputs: Callable[[Draw], dict]
    expect: Raises | Holds
    frameworks: tuple[str, ...] = ()  # only from these caller frameworks (empty: every one)
    dtype: str | None = None  # the floating dtype of q, k, v (None: the target's)
    layers: tuple[str, ...] = ()  # LAYERS only: only for these layers (empty: every one)
    options: dict = field(default_factory=dict)  # LAYERS only: constructor arguments (roles or names)
    grads: bool = False  # QKV properties: also through the gradients front end (a backward pass each)


@dataclass
class Draw:
    """What a case's inputs are made from: a seeded generator and the caller's framework and dtype."""

    rng: np.random.Generator
    framework: str
    dtype: str

    @property
    def far(self) -> float:
        """A scale whose square overflows the dtype (and whose inverse's square underflows it)."""
        return {"float16": 1e4, "bfloat16": 1e30, "float32": 1e30, "float64": 1e200}[self.dtype]

    @property
    def huge(self) -> float:
        """Near the dtype's largest value: sums of a few overflow."""
        return {"float16": 6e4, "bfloat16": 3e38, "float32": 3e38, "float64": 1.7e308}[self.dtype]


class Native:
    """An input built for the caller's framework (``make(framework)``): dtypes or devices NumPy lacks."""

    def __init__(self, make: Callable[[str], Any]):
        self.make = make


# Small enough for Triton's interpreter; one set of shapes, so JAX compiles few programs.
LEAD, NQ, NK, DIM, DV = (2,), 5, 6, 4, 3
FAST = dict(num_hashes=4, hash_bits=3)


def qkv(a: Draw, lead=LEAD, nq=NQ, nk=NK, dim=DIM, dv=DV, **options) -> dict:
    q, k, v = (a.rng.standard_normal(lead + shape) for shape in ((nq, dim), (nk, dim), (nk, dv)))
    return dict(q=q, k=k, v=v, **{**FAST, "seed": 0, **options})


def with_planes(a: Draw, mode="sample", **options) -> dict:
    """Tie-free inputs and explicit planes: exact claims (scaling, zero rows) do not depend on rounding."""
    p = draw_planes(a.rng, 4, 3, DIM)
    q = untied(a.rng, LEAD + (NQ, DIM), p[None], "gaussian")
    k = untied(a.rng, LEAD + (NK, DIM), p[None], "gaussian")
    return dict(q=q, k=k, v=a.rng.standard_normal(LEAD + (NK, DV)), planes=p, mode=mode, **FAST, **options)


def changed(make, **changes) -> Callable[[Draw], dict]:
    """``make``'s inputs with entries replaced: a value, or a function of (inputs, draw)."""

    def inputs(a: Draw) -> dict:
        d = make(a)
        for name, value in changes.items():
            d[name] = value(d, a) if callable(value) and not isinstance(value, type) else value
        return d

    return inputs


def rows_set(name: str, rows, value) -> Callable:
    """Set rows ``rows`` (an index into the leading dims + N) of input ``name`` to ``value``."""

    def set_rows(d, a):
        x = np.array(d[name], dtype=np.float64)
        x[rows] = value
        return x

    return set_rows


def scaled(name: str, factor: str | float, rows=None) -> Callable:
    """Input ``name`` multiplied by ``factor`` (``"far"``, ``"1/far"``, ``"huge"`` or a number)."""

    def scale(d, a):
        f = {"far": a.far, "1/far": 1 / a.far}.get(factor, factor)
        x = np.array(d[name], dtype=np.float64)
        if factor == "huge":  # the largest entry becomes the dtype's near-largest value
            x, f = x / np.abs(x).max(), a.huge
        if rows is None:
            return x * f
        x[rows] = x[rows] * f
        return x

    return scale


def versus(make, **changes) -> Callable[[Draw], dict]:
    """``make``'s inputs with ``changes`` applied (as in :func:`changed`), and the unchanged ones as
    ``reference``: the property compares the two results."""

    def inputs(a: Draw) -> dict:
        base = make(a)
        return {**changed(lambda _: dict(base), **changes)(a), "reference": base}

    return inputs


def masked_instead(d: dict) -> dict:
    """The inputs with every zero row of q and k masked instead (its content replaced by ones)."""
    twin = dict(d)
    q, k = np.array(d["q"], dtype=np.float64), np.array(d["k"], dtype=np.float64)
    qm, km = ~np.all(q == 0, axis=-1), ~np.all(k == 0, axis=-1)
    q[~qm], k[~km] = 1.0, 1.0
    twin.update(q=q, k=k, query_mask=qm, key_padding_mask=km)
    return twin


def zero_rows(make, q_rows=(), k_rows=()) -> Callable[[Draw], dict]:
    """``make``'s inputs with some rows of q and k zeroed, and their masked twin as the reference."""

    def inputs(a: Draw) -> dict:
        d = make(a)
        q, k = np.array(d["q"], dtype=np.float64), np.array(d["k"], dtype=np.float64)
        for r in q_rows:
            q[r] = 0
        for r in k_rows:
            k[r] = 0
        d.update(q=q, k=k)
        return {**d, "reference": masked_instead(d)}

    return inputs


def native(torch_make=None, jax_make=None, numpy_make=None) -> Native:
    """A value made by the caller framework's own library (None where a framework has none)."""

    def make(framework):
        maker = {"torch": torch_make, "jax": jax_make, "numpy": numpy_make}[framework]
        if maker is None:
            raise LookupError(framework)
        return maker()

    return Native(make)


def _torch_float8():
    import torch

    return [torch.randn(LEAD + s).to(torch.float8_e4m3fn) for s in ((NQ, DIM), (NK, DIM), (NK, DV))]


def _jax_float8():
    import jax.numpy as jnp

    return [jnp.ones(LEAD + s, jnp.float8_e4m3fn) for s in ((NQ, DIM), (NK, DIM), (NK, DV))]


def _torch_meta():
    import torch

    return [torch.empty(LEAD + s, device="meta") for s in ((NQ, DIM), (NK, DIM), (NK, DV))]


def _triple(make):
    """q, k, v built by the framework (one Native per argument, from one call)."""
    made = {}

    def part(i):
        def make_part(framework):
            if framework not in made:
                made[framework] = Native(make).make(framework)
            return made[framework][i]

        return Native(make_part)

    return {"q": part(0), "k": part(1), "v": part(2)}


def triple(torch_make=None, jax_make=None, numpy_make=None) -> dict:
    return _triple(native(torch_make, jax_make, numpy_make).make)


def big_endian(name: str) -> Callable:
    """Input ``name`` as a big-endian NumPy array of the caller's dtype (a Native: kept as it is)."""
    return lambda d, a: Native(lambda fw, x=d[name]: np.asarray(x, np.dtype(a.dtype).newbyteorder(">")))


# ---- yoso.attention, its gradients, yoso.backend_for -----------------------------------------------------

E = ValueError
T = TypeError
MIXED = Native(lambda fw: np.ones(LEAD + (NK, DIM)))  # NumPy among torch or JAX arrays

QKV: list[Case] = [
    # ranks, sizes, shapes
    Case("q-rank-1", changed(qkv, q=lambda d, a: d["q"][0, 0]), Raises(E, "q", r"at least 2 dims")),
    Case("k-rank-1", changed(qkv, k=lambda d, a: d["k"][0, 0]), Raises(E, "k", r"at least 2 dims")),
    Case("v-rank-1", changed(qkv, v=lambda d, a: d["v"][0, 0]), Raises(E, "v", r"at least 2 dims")),
    Case("q-rank-0", changed(qkv, q=lambda d, a: np.asarray(d["q"][0, 0, 0])), Raises(E, "q")),
    Case("q-empty-N", changed(qkv, q=lambda d, a: d["q"][:, :0]), Raises(E, "q", "empty dimension")),
    Case("k-empty-N", changed(qkv, k=lambda d, a: d["k"][:, :0], v=lambda d, a: d["v"][:, :0]), Raises(E, "k")),
    Case("q-empty-D", changed(qkv, q=lambda d, a: d["q"][..., :0], k=lambda d, a: d["k"][..., :0]), Raises(E, "q")),
    Case("v-empty-Dv", changed(qkv, v=lambda d, a: d["v"][..., :0]), Raises(E, "v", "empty dimension")),
    Case("empty-lead", changed(qkv, q=lambda d, a: d["q"][:0]), Raises(E, "q", "empty dimension")),
    Case("D-mismatch", changed(qkv, k=lambda d, a: d["k"][..., :3]), Raises(E, "k", r"share the last dim D")),
    Case("Nk-mismatch", changed(qkv, v=lambda d, a: d["v"][:, :5]), Raises(E, "v", r"as many rows as k")),
    Case(
        "lead-mismatch",
        changed(qkv, k=lambda d, a: np.zeros((3, NK, DIM)) + 1, v=lambda d, a: np.ones((3, NK, DV))),
        Raises(E, "k", "broadcast"),
    ),
    Case("causal-Nq-Nk", changed(qkv, causal=True), Raises(E, "causal", r"Nq=5.*Nk=6")),
    # dtypes and array types
    Case("q-int", changed(qkv, q=lambda d, a: d["q"].astype(np.int32)), Raises(T, "q", "floating")),
    Case("all-int", lambda a: {**qkv(a), **{n: np.ones((2, 5, 4), np.int64) for n in "qkv"}}, Raises(T, "q")),
    Case("q-bool", changed(qkv, q=lambda d, a: d["q"] > 0), Raises(T, "q", "floating")),
    Case("v-complex", changed(qkv, v=lambda d, a: d["v"].astype(np.complex64)), Raises(T, "v", "floating")),
    Case("all-complex", lambda a: {**qkv(a), **{n: np.ones((2, 5, 4), np.complex64) for n in "qkv"}}, Raises(T, "q")),
    Case("float8", lambda a: {**qkv(a), **triple(_torch_float8, _jax_float8)}, Raises(T, "q", "float8")),
    Case(
        "float128",
        lambda a: {**qkv(a), **{n: np.ones((2, 5, 4), np.longdouble) for n in "qkv"}},
        Raises(T, "q"),
        frameworks=("numpy",),
    ),
    Case("meta-device", lambda a: {**qkv(a), **triple(_torch_meta)}, Raises(E, "q", "meta"), frameworks=("torch",)),
    Case(
        "mixed-dtypes",
        changed(qkv, v=Native(lambda fw: _cast(np.ones(LEAD + (NK, DV)), fw, "float16"))),
        Raises(T, "v", "share one dtype"),
    ),
    Case("mixed-frameworks", changed(qkv, k=MIXED), Raises(T, "k", "one framework"), frameworks=("torch", "jax")),
    Case("q-list", changed(qkv, q=Native(lambda fw: [[1.0] * DIM] * NQ)), Raises(T, "q")),
    Case("v-None", changed(qkv, v=Native(lambda fw: None)), Raises(T, "v")),
    Case("k-string", changed(qkv, k=Native(lambda fw: "keys")), Raises(T, "k")),
    # hyperparameters
    Case("num_hashes-0", changed(qkv, num_hashes=0), Raises(E, "num_hashes", ">= 1")),
    Case("num_hashes-negative", changed(qkv, num_hashes=-3), Raises(E, "num_hashes")),
    Case("num_hashes-float", changed(qkv, num_hashes=2.5), Raises(T, "num_hashes")),
    Case("num_hashes-str", changed(qkv, num_hashes="4"), Raises(T, "num_hashes")),
    Case("num_hashes-bool", changed(qkv, num_hashes=True), Raises(T, "num_hashes")),
    Case("num_hashes-2^31", changed(qkv, num_hashes=2**31), Raises(E, "num_hashes", "65536")),
    Case("num_hashes-10^30", changed(qkv, num_hashes=10**30), Raises(E, "num_hashes", "65536")),
    Case("num_hashes-bound+1", changed(qkv, num_hashes=65537), Raises(E, "num_hashes", "<= 65536")),
    Case("num_hashes-None", changed(qkv, num_hashes=None), Raises(T, "num_hashes")),
    Case("hash_bits-0", changed(qkv, hash_bits=0), Raises(E, "hash_bits", r"\[1, 16\]")),
    Case("hash_bits-17", changed(qkv, hash_bits=17), Raises(E, "hash_bits", r"\[1, 16\]")),
    Case("hash_bits-negative", changed(qkv, hash_bits=-1), Raises(E, "hash_bits")),
    Case("hash_bits-float", changed(qkv, hash_bits=3.0), Raises(T, "hash_bits")),
    Case("hash_bits-None", changed(qkv, hash_bits=None), Raises(T, "hash_bits")),
    Case("hash_bits-str", changed(qkv, hash_bits="8"), Raises(T, "hash_bits")),
    Case("mode-unknown", changed(qkv, mode="fast"), Raises(E, "mode")),
    Case("mode-None", changed(qkv, mode=None), Raises(E, "mode")),
    Case("mode-capitalised", changed(qkv, mode="Sample"), Raises(E, "mode")),
    Case("hashing-unknown", changed(qkv, hashing="simhash"), Raises(E, "hashing")),
    Case("hashing-None", changed(qkv, hashing=None), Raises(E, "hashing")),
    Case("backward-unknown", changed(qkv, backward="true"), Raises(E, "backward")),
    Case("backward-None", changed(qkv, backward=None), Raises(E, "backward")),
    Case("causal-int", changed(qkv, causal=1), Raises(T, "causal", "bool")),
    Case("causal-str", changed(qkv, causal="yes"), Raises(T, "causal")),
    Case("causal-None", changed(qkv, causal=None), Raises(T, "causal")),
    Case("normalize-str", changed(qkv, normalize="yes"), Raises(T, "normalize", "bool")),
    Case("normalize-int", changed(qkv, normalize=0), Raises(T, "normalize")),
    Case("normalize-None", changed(qkv, normalize=None), Raises(T, "normalize")),
    Case("hadamard-bits>D'", changed(qkv, hashing="hadamard", hash_bits=8), Raises(E, "hash_bits", "Hadamard")),
    Case(
        "hadamard-bits>D'-expectation",
        changed(qkv, hashing="hadamard", hash_bits=8, mode="expectation", seed=None),
        Raises(E, "hash_bits"),
    ),
    # randomness
    Case("seed-negative", changed(qkv, seed=-1), Raises(T, "seed", "non-negative")),
    Case("seed-float", changed(qkv, seed=1.5), Raises(T, "seed")),
    Case("seed-str", changed(qkv, seed="0"), Raises(T, "seed")),
    Case("seed-bool", changed(qkv, seed=True), Raises(T, "seed")),
    Case("seed-negative-expectation", changed(qkv, seed=-1, mode="expectation"), Raises(T, "seed")),
    Case("seed-str-expectation", changed(qkv, seed="x", mode="expectation"), Raises(T, "seed")),
    Case("generator-not-a-generator", changed(qkv, seed=None, generator="g"), Raises(T, "generator")),
    Case(
        "generator-expectation",
        changed(qkv, seed=None, generator=object(), mode="expectation"),
        Raises(T, "generator"),
    ),
    Case("key-not-a-key", changed(qkv, seed=None, key=5), Raises(T, "key")),
    Case("key-expectation", changed(qkv, seed=None, key="k", mode="expectation"), Raises(T, "key")),
    Case("seed-huge", changed(qkv, seed=2**70), Holds("finite")),
    Case("seed-generator", changed(qkv, seed=lambda d, a: np.random.default_rng(3)), Holds("finite")),
    # masks
    Case("kpm-length", changed(qkv, key_padding_mask=np.ones((2, 5), bool)), Raises(E, "key_padding_mask", "Nk")),
    Case("kpm-lead", changed(qkv, key_padding_mask=np.ones((3, 6), bool)), Raises(E, "key_padding_mask")),
    Case("kpm-extra-lead", changed(qkv, key_padding_mask=np.ones((3, 2, 6), bool)), Raises(E, "key_padding_mask")),
    Case("kpm-float", changed(qkv, key_padding_mask=np.ones((2, 6), np.float32)), Raises(T, "key_padding_mask")),
    Case("kpm-int", changed(qkv, key_padding_mask=np.ones((2, 6), np.int64)), Raises(T, "key_padding_mask")),
    Case("kpm-0d", changed(qkv, key_padding_mask=np.array(True)), Raises(E, "key_padding_mask")),
    Case("kpm-list", changed(qkv, key_padding_mask=Native(lambda fw: [True] * NK)), Raises(T, "key_padding_mask")),
    Case("qm-length", changed(qkv, query_mask=np.ones((2, 6), bool)), Raises(E, "query_mask", "Nq")),
    Case("qm-float", changed(qkv, query_mask=np.ones((2, 5), np.float64)), Raises(T, "query_mask")),
    Case("qm-lead", changed(qkv, query_mask=np.ones((4, 5), bool)), Raises(E, "query_mask")),
    Case("kpm-broadcast", changed(qkv, key_padding_mask=np.ones((1, 6), bool)), Holds("finite")),
    Case("kpm-1d", changed(qkv, key_padding_mask=np.arange(6) < 4), Holds("finite")),
    Case("kpm-all-false", changed(qkv, key_padding_mask=np.zeros((2, 6), bool)), Holds("warns")),
    Case(
        "kpm-one-row-false",
        changed(qkv, key_padding_mask=np.array([[True] * 6, [False] * 6])),
        Holds("finite"),
    ),
    Case("qm-all-false", changed(qkv, query_mask=np.zeros((2, 5), bool)), Holds("finite")),
    Case("causal-masked", lambda a: qkv(a, nk=5, causal=True, key_padding_mask=np.arange(5) != 2), Holds("finite")),
    # explicit hash functions
    Case(
        "planes-shape", changed(qkv, seed=None, planes=np.ones((4, 3, 5))), Raises(E, "planes", r"\[\.\.\., 4, 3, 4\]")
    ),
    Case("planes-lead", changed(qkv, seed=None, planes=np.ones((3, 4, 3, 4))), Raises(E, "planes", "broadcast")),
    Case("planes-too-many-lead", changed(qkv, seed=None, planes=np.ones((1, 1, 4, 3, 4))), Raises(E, "planes")),
    Case("planes-and-seed", changed(qkv, planes=np.ones((4, 3, 4))), Raises(E, "planes", "either planes=")),
    Case("planes-nan", changed(qkv, seed=None, planes=np.full((4, 3, 4), np.nan)), Raises(E, "planes", "NaN")),
    Case("planes-inf", changed(qkv, seed=None, planes=np.full((4, 3, 4), np.inf)), Raises(E, "planes", "inf")),
    Case(
        "planes-hadamard-not-pm1",
        changed(qkv, seed=None, hashing="hadamard", hash_bits=2, num_hashes=4, planes=np.full((2, 3, 4), 0.5)),
        Raises(E, "planes", "±1"),
    ),
    Case("planes-int", changed(qkv, seed=None, planes=np.ones((4, 3, 4), np.int64)), Raises(T, "planes")),
    Case("planes-list", changed(qkv, seed=None, planes=[[[1.0] * 4] * 3] * 4), Raises(T, "planes")),
    Case("planes-complex", changed(qkv, seed=None, planes=np.ones((4, 3, 4), np.complex128)), Raises(T, "planes")),
    Case(
        "planes-shape-expectation",
        changed(qkv, seed=None, mode="expectation", planes=np.ones((3, 3))),
        Raises(E, "planes"),
    ),
    Case(
        "planes-nan-expectation",
        changed(qkv, seed=None, mode="expectation", planes=np.full((4, 3, 4), np.nan)),
        Raises(E, "planes", "NaN"),
    ),
    Case(
        "planes-and-seed-expectation",
        changed(qkv, mode="expectation", planes=np.ones((4, 3, 4))),
        Raises(E, "planes", "either planes="),
    ),
    Case("planes-leading-ones", versus(with_planes, planes=lambda d, a: d["planes"][None]), Holds("same_as")),
    Case("planes-float16", changed(with_planes, planes=lambda d, a: d["planes"].astype(np.float16)), Holds("finite")),
    Case("planes-big-endian", versus(with_planes, planes=lambda d, a: d["planes"].astype(">f8")), Holds("same_as")),
    Case(
        "planes-per-row",
        changed(qkv, seed=None, planes=lambda d, a: yoso.hash_planes(4, 3, DIM, seed=1)[None].repeat(2, 0)),
        Holds("finite"),
    ),
    # values
    Case("q-nan", changed(qkv, q=rows_set("q", (0, 1), np.nan)), Raises(E, "q", "NaN or inf")),
    Case("k-inf", changed(qkv, k=rows_set("k", (1, 2), np.inf)), Raises(E, "k", "NaN or inf")),
    Case("v-minus-inf", changed(qkv, v=rows_set("v", (0, 5), -np.inf)), Raises(E, "v", "NaN or inf")),
    Case("q-all-nan", changed(qkv, q=rows_set("q", (), np.nan)), Raises(E, "q")),
    Case("q-nan-expectation", changed(qkv, mode="expectation", q=rows_set("q", (1, 0), np.nan)), Raises(E, "q")),
    Case("v-nan-backend_for", changed(qkv, v=rows_set("v", (1, 1), np.nan)), Raises(E, "v")),
    Case(
        "q-nan-unmasked-row",
        changed(qkv, q=rows_set("q", (0, 1), np.nan), query_mask=np.array([[1, 1, 0, 1, 1]] * 2, bool)),
        Raises(E, "q", r"1 unmasked row"),
    ),
    Case(
        "q-nan-masked-row",
        changed(qkv, q=rows_set("q", (0, 1), np.nan), query_mask=np.array([[1, 0, 1, 1, 1]] * 2, bool)),
        Holds("finite"),
        grads=True,
    ),
    Case(
        "k-v-inf-masked-row",
        changed(
            qkv,
            k=rows_set("k", (1, 3), np.inf),
            v=rows_set("v", (1, 3), -np.inf),
            key_padding_mask=np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]], bool),
        ),
        Holds("finite"),
        grads=True,
    ),
    Case(
        "v-nan-masked-broadcast",
        changed(qkv, v=rows_set("v", (slice(None), 0), np.nan), key_padding_mask=np.arange(6) > 0),
        Holds("finite"),
    ),
    # scale: only directions matter (cause 1), and nothing overflows (cause 2)
    Case("q-far", versus(with_planes, q=scaled("q", "far")), Holds("directions"), grads=True),
    Case("q-near-zero", versus(with_planes, q=scaled("q", "1/far")), Holds("directions")),
    Case("k-far", versus(with_planes, k=scaled("k", "far")), Holds("directions")),
    Case("k-near-zero", versus(with_planes, k=scaled("k", "1/far")), Holds("directions")),
    Case("v-far", versus(with_planes, v=scaled("v", "far")), Holds("directions")),
    Case("v-near-zero", versus(with_planes, v=scaled("v", "1/far")), Holds("directions")),
    Case(
        "q-k-v-far-expectation",
        versus(lambda a: with_planes(a, mode="expectation"), **{n: scaled(n, "far") for n in "qkv"}),
        Holds("directions"),
    ),
    Case(
        "q-k-near-zero-expectation",
        versus(lambda a: with_planes(a, mode="expectation"), **{n: scaled(n, "1/far") for n in "qk"}),
        Holds("directions"),
    ),
    Case(
        "q-rows-mixed-scales",
        versus(with_planes, q=scaled("q", "far", (0, slice(0, 2)))),
        Holds("directions"),
    ),
    Case(
        "k-rows-mixed-scales",
        versus(with_planes, k=scaled("k", "1/far", (1, slice(1, 4)))),
        Holds("directions"),
    ),
    Case(
        "v-one-batch-row-far",
        versus(with_planes, v=scaled("v", "far", (1,))),
        Holds("directions"),
    ),
    Case("v-huge", changed(qkv, v=scaled("v", "huge")), Holds("finite"), grads=True),
    Case("v-huge-expectation", changed(qkv, mode="expectation", v=scaled("v", "huge")), Holds("finite")),
    Case("v-huge-exact-backward", changed(qkv, backward="exact", v=scaled("v", "huge")), Holds("finite")),
    Case(
        "v-huge-causal",
        changed(lambda a: qkv(a, nk=5, causal=True), v=scaled("v", "huge")),
        Holds("finite"),
    ),
    Case(
        "v-huge-unnormalised-fits",
        changed(qkv, normalize=False, v=lambda d, a: np.sign(d["v"]) * a.huge / 64),
        Holds("finite"),
    ),
    Case(
        "v-huge-unnormalised-overflows",
        lambda a: dict(
            q=np.ones((1, 4, 3)),
            k=np.ones((1, 4, 3)),
            v=np.full((1, 4, 2), a.huge),
            mode="expectation",
            normalize=False,
        ),
        Raises(E, "normalize", "too large"),
    ),
    Case(
        "float16-unnormalised-overflows",
        lambda a: dict(
            q=np.ones((1, 4, 3)), k=np.ones((1, 4, 3)), v=np.full((1, 4, 2), 3e4), mode="expectation", normalize=False
        ),
        Raises(E, "normalize", "overflows float16", computed=True),
        dtype="float16",
    ),
    Case("all-far", changed(qkv, **{n: scaled(n, "far") for n in "qkv"}), Holds("finite")),
    Case("all-near-zero", changed(qkv, **{n: scaled(n, "1/far") for n in "qkv"}), Holds("finite"), grads=True),
    Case(
        "float16-beyond-256",
        changed(qkv, mode="expectation", seed=None, **{n: scaled(n, 1000.0) for n in "qk"}),
        Holds("unit_rows"),
        dtype="float16",
    ),
    Case(
        "float16-near-max",
        changed(
            qkv, mode="expectation", seed=None, **{n: (lambda d, a, n=n: np.clip(d[n], -3, 3) * 2e4) for n in "qkv"}
        ),
        Holds("unit_rows"),
        dtype="float16",
    ),
    Case(
        "bfloat16-far",
        changed(qkv, mode="expectation", seed=None, **{n: scaled(n, 1e30) for n in "qkv"}),
        Holds("unit_rows"),
        dtype="bfloat16",
        frameworks=("torch", "jax"),
    ),
    Case("big-endian-q", versus(with_planes, q=big_endian("q")), Holds("same_as"), frameworks=("numpy",)),
    # zero vectors attend to nothing and are attended by nothing, like masked rows (cause 15)
    Case("zero-q-row", zero_rows(with_planes, q_rows=[(0, 1)]), Holds("masked_twin")),
    Case("zero-k-row", zero_rows(with_planes, k_rows=[(1, 2)]), Holds("masked_twin")),
    Case(
        "zero-q-and-k-rows", zero_rows(with_planes, q_rows=[(0, 0)], k_rows=[(0, 0)]), Holds("masked_twin"), grads=True
    ),
    Case(
        "zero-rows-expectation",
        zero_rows(lambda a: with_planes(a, mode="expectation"), q_rows=[(1, 4)], k_rows=[(1, 0), (0, 3)]),
        Holds("masked_twin"),
    ),
    Case(
        "zero-rows-causal",
        zero_rows(
            lambda a: {**(d := with_planes(a)), "k": d["k"][:, :5], "v": d["v"][:, :5], "causal": True},
            q_rows=[(0, 2)],
            k_rows=[(0, 2), (1, 0)],
        ),
        Holds("masked_twin"),
        grads=True,
    ),
    Case(
        "zero-rows-exact-backward",
        zero_rows(lambda a: with_planes(a, backward="exact"), q_rows=[(1, 1)], k_rows=[(1, 1)]),
        Holds("masked_twin"),
    ),
    Case(
        "zero-rows-hadamard",
        zero_rows(
            lambda a: {**qkv(a, hashing="hadamard", hash_bits=2, num_hashes=4)}, q_rows=[(0, 3)], k_rows=[(0, 3)]
        ),
        Holds("masked_twin"),
    ),
    Case(
        "zero-rows-unnormalised",
        zero_rows(lambda a: with_planes(a, normalize=False), q_rows=[(1, 0)], k_rows=[(0, 5)]),
        Holds("masked_twin"),
    ),
    Case("zero-q", changed(qkv, q=lambda d, a: np.zeros_like(d["q"])), Holds("finite")),
    Case("zero-k", changed(qkv, k=lambda d, a: np.zeros_like(d["k"])), Holds("finite")),
    Case("zero-v", changed(qkv, v=lambda d, a: np.zeros_like(d["v"])), Holds("finite")),
    Case(
        "zero-everything",
        changed(qkv, **{n: (lambda d, a, n=n: np.zeros_like(d[n])) for n in "qkv"}),
        Holds("finite"),
    ),
    # borderline shapes and values
    Case("single-token", lambda a: qkv(a, nq=1, nk=1), Holds("finite")),
    Case("single-token-causal", lambda a: qkv(a, nq=1, nk=1, causal=True), Holds("finite")),
    Case("D-1", lambda a: qkv(a, dim=1), Holds("finite")),
    Case("no-lead", lambda a: qkv(a, lead=()), Holds("finite")),
    Case("lead-broadcast", changed(qkv, k=lambda d, a: d["k"][:1], v=lambda d, a: d["v"][:1]), Holds("finite")),
    Case("one-hash-one-bit", changed(qkv, num_hashes=1, hash_bits=1), Holds("finite")),
    Case("numpy-int-hyperparameters", changed(qkv, num_hashes=np.int64(4), hash_bits=np.int32(3)), Holds("finite")),
    Case(
        "antipodal-keys",
        changed(lambda a: qkv(a, nk=NQ, mode="expectation"), k=lambda d, a: -d["q"]),
        Holds("finite"),
    ),
    Case("identical-rows", lambda a: {**qkv(a), "q": np.ones((2, 5, 4)), "k": np.ones((2, 6, 4))}, Holds("finite")),
    Case("duplicate-keys", changed(qkv, k=lambda d, a: np.repeat(d["k"][:, :1], 6, axis=1)), Holds("finite")),
    Case("causal-expectation", lambda a: qkv(a, nk=5, causal=True, mode="expectation"), Holds("finite")),
]


def _cast(x: np.ndarray, framework: str, dtype: str):
    from yoso.testing import to_framework

    return to_framework(x, framework, dtype=dtype)


# ---- yoso.hash_codes ------------------------------------------------------------------------------------


def rows(a: Draw, n=NQ, dim=DIM, **options) -> dict:
    return dict(x=a.rng.standard_normal(LEAD + (n, dim)), **{**FAST, "seed": 0, **options})


def tied_free_rows(a: Draw, **options) -> dict:
    p = draw_planes(a.rng, 4, 3, DIM)
    return dict(x=untied(a.rng, LEAD + (NQ, DIM), p[None], "gaussian"), planes=p, **FAST, **options)


ROWS: list[Case] = [
    Case("x-rank-1", changed(rows, x=lambda d, a: d["x"][0, 0]), Raises(E, "x", "at least 2 dims")),
    Case("x-empty", changed(rows, x=lambda d, a: d["x"][:, :0]), Raises(E, "x", "empty")),
    Case("x-int", changed(rows, x=lambda d, a: d["x"].astype(np.int16)), Raises(T, "x", "floating")),
    Case("x-float8", lambda a: {**rows(a), "x": triple(_torch_float8, _jax_float8)["q"]}, Raises(T, "x")),
    Case("x-meta", lambda a: {**rows(a), "x": triple(_torch_meta)["q"]}, Raises(E, "x", "meta"), frameworks=("torch",)),
    Case("x-list", changed(rows, x=Native(lambda fw: [[1.0, 2.0]])), Raises(T, "x")),
    Case("x-nan", changed(rows, x=rows_set("x", (1, 3), np.nan)), Raises(E, "x", "NaN or inf")),
    Case("x-inf", changed(rows, x=rows_set("x", (0, 0), -np.inf)), Raises(E, "x", "NaN or inf")),
    Case("codes-num_hashes-0", changed(rows, num_hashes=0), Raises(E, "num_hashes")),
    Case("codes-num_hashes-2^31", changed(rows, num_hashes=2**31), Raises(E, "num_hashes")),
    Case("codes-hash_bits-17", changed(rows, hash_bits=17), Raises(E, "hash_bits")),
    Case("codes-hashing", changed(rows, hashing="lsh"), Raises(E, "hashing")),
    Case("codes-hadamard-bits", changed(rows, hashing="hadamard", hash_bits=8), Raises(E, "hash_bits")),
    Case("codes-planes-shape", changed(rows, seed=None, planes=np.ones((4, 3))), Raises(E, "planes")),
    Case("codes-planes-nan", changed(rows, seed=None, planes=np.full((4, 3, 4), np.nan)), Raises(E, "planes")),
    Case("codes-planes-and-seed", changed(rows, planes=np.ones((4, 3, 4))), Raises(E, "planes")),
    Case("codes-planes-lead", changed(rows, seed=None, planes=np.ones((5, 4, 3, 4))), Raises(E, "planes")),
    Case(
        "codes-planes-not-pm1",
        changed(rows, seed=None, hashing="hadamard", hash_bits=2, planes=np.full((2, 3, 4), 2.0)),
        Raises(E, "planes"),
    ),
    Case("codes-seed", changed(rows, seed=-5), Raises(T, "seed")),
    Case("codes-generator", changed(rows, seed=None, generator=3), Raises(T, "generator")),
    Case("codes-key", changed(rows, seed=None, key="key"), Raises(T, "key")),
    Case("codes-far", versus(tied_free_rows, x=scaled("x", "far")), Holds("same_as")),
    Case("codes-near-zero", versus(tied_free_rows, x=scaled("x", "1/far")), Holds("same_as")),
    Case(
        "codes-rows-mixed-scales",
        versus(tied_free_rows, x=scaled("x", "far", (1, slice(0, 3)))),
        Holds("same_as"),
    ),
    Case("codes-zero-row", changed(rows, x=rows_set("x", (0, 2), 0.0)), Holds("zero_row_code_0")),
    Case(
        "codes-planes-leading-ones",
        versus(tied_free_rows, planes=lambda d, a: d["planes"][None]),
        Holds("same_as"),
    ),
    Case("codes-big-endian", versus(tied_free_rows, x=big_endian("x")), Holds("same_as"), frameworks=("numpy",)),
    Case("codes-single-row", lambda a: rows(a, n=1, dim=1), Holds("codes_in_range")),
    Case(
        "codes-hadamard-zero-row",
        changed(rows, hashing="hadamard", hash_bits=2, x=rows_set("x", (1, 0), 0.0)),
        Holds("zero_row_code_0"),
    ),
]

# ---- yoso.hash_planes -----------------------------------------------------------------------------------

PLANES: list[Case] = [
    Case("planes-num_hashes-0", lambda a: dict(num_hashes=0, hash_bits=3, dim=4), Raises(E, "num_hashes")),
    Case("planes-num_hashes-2^31", lambda a: dict(num_hashes=2**31, hash_bits=3, dim=4), Raises(E, "num_hashes")),
    Case("planes-num_hashes-10^30", lambda a: dict(num_hashes=10**30, hash_bits=3, dim=4), Raises(E, "num_hashes")),
    Case("planes-num_hashes-float", lambda a: dict(num_hashes=2.0, hash_bits=3, dim=4), Raises(T, "num_hashes")),
    Case("planes-hash_bits-0", lambda a: dict(num_hashes=2, hash_bits=0, dim=4), Raises(E, "hash_bits")),
    Case("planes-hash_bits-17", lambda a: dict(num_hashes=2, hash_bits=17, dim=4), Raises(E, "hash_bits")),
    Case("planes-hash_bits-str", lambda a: dict(num_hashes=2, hash_bits="3", dim=4), Raises(T, "hash_bits")),
    Case("planes-dim-0", lambda a: dict(num_hashes=2, hash_bits=3, dim=0), Raises(E, "dim")),
    Case("planes-dim-negative", lambda a: dict(num_hashes=2, hash_bits=3, dim=-4), Raises(E, "dim")),
    Case("planes-dim-float", lambda a: dict(num_hashes=2, hash_bits=3, dim=4.0), Raises(E, "dim")),
    Case("planes-dim-bool", lambda a: dict(num_hashes=2, hash_bits=3, dim=True), Raises(E, "dim")),
    Case("planes-hashing", lambda a: dict(num_hashes=2, hash_bits=3, dim=4, hashing="x"), Raises(E, "hashing")),
    Case(
        "planes-hadamard-bits",
        lambda a: dict(num_hashes=2, hash_bits=8, dim=4, hashing="hadamard"),
        Raises(E, "hash_bits"),
    ),
    Case("planes-seed", lambda a: dict(num_hashes=2, hash_bits=3, dim=4, seed=-1), Raises(T, "seed")),
    Case("planes-seed-str", lambda a: dict(num_hashes=2, hash_bits=3, dim=4, seed="s"), Raises(T, "seed")),
    Case("planes-smallest", lambda a: dict(num_hashes=1, hash_bits=1, dim=1), Holds("planes_layout")),
    Case(
        "planes-hadamard-smallest",
        lambda a: dict(num_hashes=1, hash_bits=1, dim=1, hashing="hadamard"),
        Holds("planes_layout"),
    ),
    Case(
        "planes-numpy-ints",
        lambda a: dict(num_hashes=np.int8(3), hash_bits=np.uint8(2), dim=np.int64(5)),
        Holds("planes_layout"),
    ),
    Case("planes-bound", lambda a: dict(num_hashes=65536, hash_bits=1, dim=1), Holds("planes_layout")),
]


# ---- the model layers ---------------------------------------------------------------------------------

B, N, WIDTH, HEADS = 2, 6, 8, 2
PADDED = np.array([[True] * 6, [True] * 4 + [False] * 2])  # example 1 has two padded tokens


def tokens(a: Draw, **extra) -> dict:
    return dict(input=a.rng.standard_normal((B, N, WIDTH)), mask=PADDED.copy(), **extra)


def padded_with(value) -> Callable[[Draw], dict]:
    """Tokens whose padded positions hold ``value``; the reference holds ordinary values there."""

    def inputs(a: Draw) -> dict:
        d = tokens(a)
        x = d["input"].copy()
        x[~PADDED] = value
        return {**d, "input": x, "reference": d}

    return inputs


L = dict(width=WIDTH, heads=HEADS, num_hashes=4, hash_bits=3)

LAYERS: list[Case] = [
    # construction
    Case("width-not-divisible", tokens, Raises(E, "heads"), options={**L, "heads": 3}, layers=("nn", "nnx")),
    Case("heads-0", tokens, Raises(E, "heads"), options={**L, "heads": 0}, layers=("nn", "nnx")),
    Case("width-0", tokens, Raises(E, "width"), options={**L, "width": 0}, layers=("nn", "nnx")),
    Case("width-float", tokens, Raises(E, "width"), options={**L, "width": 8.0}, layers=("nn", "nnx")),
    Case("layer-num_hashes-0", tokens, Raises(E, "num_hashes"), options={**L, "num_hashes": 0}),
    Case("layer-num_hashes-2^31", tokens, Raises(E, "num_hashes"), options={**L, "num_hashes": 2**31}),
    Case("layer-hash_bits-17", tokens, Raises(E, "hash_bits"), options={**L, "hash_bits": 17}),
    Case("layer-mode", tokens, Raises(E, "mode"), options={**L, "mode": "fast"}),
    Case("layer-hashing", tokens, Raises(E, "hashing"), options={**L, "hashing": "lsh"}),
    Case("layer-backward", tokens, Raises(E, "backward"), options={**L, "backward": "true"}),
    Case("layer-eval_mode", tokens, Raises(E, "eval_mode"), options={**L, "eval_mode": "fast"}),
    Case(
        "layer-hadamard-head-dim",
        tokens,
        Raises(E, "hash_bits"),
        options={**L, "hashing": "hadamard", "hash_bits": 8},
        layers=("nn", "nnx"),
    ),
    Case("dropout-1", tokens, Raises(E, "dropout"), options={**L, "dropout": 1.0}, layers=("nn", "nnx")),
    Case("dropout-negative", tokens, Raises(E, "dropout"), options={**L, "dropout": -0.1}, layers=("nn", "nnx")),
    Case("dropout-str", tokens, Raises(E, "dropout"), options={**L, "dropout": "a"}, layers=("nn", "nnx")),
    Case("dropout-bool", tokens, Raises(E, "dropout"), options={**L, "dropout": True}, layers=("nn", "nnx")),
    Case("conv_window-0", tokens, Raises(E, "conv_window"), options={**L, "conv_window": 0}, layers=("nn",)),
    Case(
        "eval_seed-with-expectation",
        tokens,
        Raises(E, "eval_seed"),
        options={**L, "eval_seed": 1},
        layers=("nn",),
    ),
    # calls
    Case(
        "input-rank-2",
        changed(tokens, input=lambda d, a: d["input"][0]),
        Raises(E, "input"),
        options=L,
        layers=("nn", "hf"),
    ),
    Case("input-rank-1", changed(tokens, input=lambda d, a: d["input"][0, 0]), Raises(E, "input"), options=L),
    Case(
        "input-features",
        changed(tokens, input=lambda d, a: d["input"][..., :6]),
        Raises(E, "input"),
        options=L,
        layers=("nn", "nnx"),
    ),
    Case("input-int", changed(tokens, input=lambda d, a: d["input"].astype(np.int32)), Raises(T, "input"), options=L),
    Case("input-list", changed(tokens, input=Native(lambda fw: [[1.0] * WIDTH])), Raises(T, "input"), options=L),
    Case("mask-int", changed(tokens, mask=lambda d, a: d["mask"].astype(np.int32)), Raises(T, "mask"), options=L),
    Case("mask-shape", changed(tokens, mask=lambda d, a: d["mask"][:, :5]), Raises(E, "mask"), options=L),
    Case("real-token-nan", changed(tokens, input=rows_set("input", (0, 1), np.nan)), Raises(E, "q", "NaN"), options=L),
    Case(
        "deterministic-str",
        lambda a: tokens(a, deterministic="a"),
        Raises(T, "deterministic"),
        options=L,
        layers=("nnx",),
    ),
    # padded tokens cannot reach real ones, whatever they hold (causes 3 and 8)
    Case("pad-nan", padded_with(np.nan), Holds("no_leak"), options=L),
    Case("pad-inf", padded_with(np.inf), Holds("no_leak"), options=L),
    Case("pad-minus-inf", padded_with(-np.inf), Holds("no_leak"), options=L),
    Case("pad-huge", padded_with(1e30), Holds("no_leak"), options=L),
    Case("pad-minus-1e4", padded_with(-1e4), Holds("no_leak"), options=L),
    Case("pad-nan-expectation", padded_with(np.nan), Holds("no_leak"), options={**L, "mode": "expectation"}),
    Case("pad-nan-causal", padded_with(np.nan), Holds("no_leak"), options={**L, "causal": True}),
    Case(
        "pad-nan-hadamard", padded_with(np.nan), Holds("no_leak"), options={**L, "hashing": "hadamard", "hash_bits": 2}
    ),
    Case(
        "pad-nan-unnormalised",
        padded_with(np.nan),
        Holds("no_leak"),
        options={**L, "normalize": False},
        layers=("nn", "nnx"),
    ),
    Case("pad-nan-yoso-c", padded_with(np.nan), Holds("no_leak"), options={**L, "conv_window": 3}, layers=("nn",)),
    Case("pad-inf-yoso-c", padded_with(np.inf), Holds("no_leak"), options={**L, "conv_window": 3}, layers=("nn",)),
    Case(
        "pad-nan-yoso-c-causal",
        padded_with(np.nan),
        Holds("no_leak"),
        options={**L, "conv_window": 2, "causal": True},
        layers=("nn",),
    ),
    Case("all-padded", changed(tokens, mask=np.zeros((B, N), bool)), Holds("warns"), options=L),
    Case("no-padding", changed(tokens, mask=np.ones((B, N), bool)), Holds("finite"), options=L),
    Case("no-mask", changed(tokens, mask=None), Holds("finite"), options=L),
    Case("real-tokens-far", changed(tokens, input=scaled("input", 1e30)), Holds("finite"), options=L),
    Case("real-tokens-near-zero", changed(tokens, input=scaled("input", 1e-30)), Holds("finite"), options=L),
]


def all_ids() -> list[str]:
    return [c.id for c in QKV + ROWS + PLANES + LAYERS]
