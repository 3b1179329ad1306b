"""What is timed: one callable per (method, pass, dtype, N), on the method's own framework.

Methods: per backend, N-YOSO-m (``mode="sample"``, ``backward="lower_bound"``) and N-YOSO-E
(``mode="expectation"``); once per run, torch's ``scaled_dot_product_attention`` on identically
shaped ``[B, H, N, D]`` tensors (FlashAttention/cuDNN on a GPU, its CPU kernel otherwise).

Each backend is fed the arrays it computes on (``yoso.testing.framework_for``): the reference
NumPy arrays, JAX backends jax arrays, Triton/CUDA backends torch tensors, so no conversion is timed;
the backend torch users get by default, when it computes on another framework, is timed on torch tensors
too (``.../torch`` methods: what a torch user sees, conversions included).
The forward pass runs without gradient tracking; forward+backward computes the gradients of q, k
and v for a fixed random cotangent (NumPy: ``attention_vjp``; torch: ``torch.autograd.grad``; JAX:
``jax.vjp`` under ``jax.jit``, compiled before timing). The hash functions are drawn once and passed
as ``planes=`` so no random number generation is timed. Inputs are i.i.d. Gaussian: the cost of the
table form does not depend on how tokens fall into buckets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import yoso
from yoso import backends
from yoso.testing import framework_for, to_framework

PASSES = ("forward", "forward_backward")
PASS_LABELS = {"forward": "forward", "forward_backward": "forward+backward"}
SDPA = "sdpa"


@dataclass(frozen=True)
class Method:
    id: str  # "sdpa", "<backend>/yoso-<m>", "<backend>/yoso-e", each with "/torch" for torch tensors
    label: str
    kind: str  # "sdpa", "yoso" or "yoso-e"
    backend: str | None
    framework: str  # the array type it is fed

    def describe(self, num_hashes: int) -> str:
        if self.kind == SDPA:
            return "torch.nn.functional.scaled_dot_product_attention (exact softmax attention)"
        if self.kind == "yoso":
            return f"yoso.attention(mode='sample', num_hashes={num_hashes}, backward='lower_bound') on {self.backend}"
        return f"yoso.attention(mode='expectation', backward='lower_bound') on {self.backend}"


def methods_for(backend_names, num_hashes: int, device: str = "cpu") -> list[Method]:
    """SDPA first (the baseline every ratio refers to), then YOSO-m and YOSO-E per backend on its own arrays;
    and again on torch tensors for the backend a torch user gets by default (``yoso.backend_for``) when it
    computes on another framework (on a CPU: the jax backend serving torch tensors through DLPack)."""
    found = [Method(SDPA, "SDPA", SDPA, None, "torch")]
    torch_default = _torch_default(device)
    for name in backend_names:
        framework = framework_for(backends.get(name))
        found.append(Method(f"{name}/yoso-{num_hashes}", f"N-YOSO-{num_hashes} ({name})", "yoso", name, framework))
        found.append(Method(f"{name}/yoso-e", f"N-YOSO-E ({name})", "yoso-e", name, framework))
        if name == torch_default and framework != "torch":
            label = f"N-YOSO-{num_hashes} ({name}, torch tensors)"
            found.append(Method(f"{name}/yoso-{num_hashes}/torch", label, "yoso", name, "torch"))
            found.append(Method(f"{name}/yoso-e/torch", f"N-YOSO-E ({name}, torch tensors)", "yoso-e", name, "torch"))
    return found


def _torch_default(device: str) -> str | None:
    """The backend automatic selection gives float32 torch tensors on ``device`` (None: none, or no torch)."""
    try:
        import torch

        x = torch.zeros((1, 2, 4), device=device)
        return yoso.backend_for(x, x, x)
    except Exception:  # noqa: BLE001 -- no torch, no device, no backend: no torch-tensor rows
        return None


def framework_for_dtype(method: Method, dtype: str) -> tuple[str | None, str | None]:
    """(framework, None) to feed ``method`` ``dtype`` arrays, or (None, why it cannot)."""
    if method.framework == "numpy" and dtype == "bfloat16":
        impl = backends.get(method.backend)
        if "torch" in impl.frameworks:
            return "torch", None  # the torch glue promotes bfloat16 for NumPy backends
        return None, f"NumPy has no bfloat16 and the {method.backend!r} backend serves no torch tensors"
    return method.framework, None


def backend_context(method: Method):
    return yoso.set_backend(method.backend) if method.backend else contextlib.nullcontext()


@dataclass
class Workload:
    """``fn()`` does the work once and returns what must be waited for; ``input_bytes`` what the inputs hold."""

    fn: Callable[[], object]
    input_bytes: int
    framework: str
    note: str | None = None


def _inputs(batch, heads, n, dim, seed):
    rng = np.random.default_rng(seed)
    shape = (batch, heads, n, dim)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]  # q, k, v, cotangent


def _yoso_options(method: Method, num_hashes: int, tau: int) -> dict:
    if method.kind == "yoso":
        return dict(mode="sample", num_hashes=num_hashes, hash_bits=tau, backward="lower_bound")
    return dict(mode="expectation", hash_bits=tau, backward="lower_bound")


def build(method: Method, pass_: str, *, dtype, batch, heads, n, dim, num_hashes, tau, device, seed) -> Workload:
    """The callable for one point (call inside :func:`backend_context`: JAX compiles here)."""
    host = _inputs(batch, heads, n, dim, seed)
    itemsize = 2 if dtype in ("bfloat16", "float16") else 4
    input_bytes = (3 + (pass_ == "forward_backward")) * host[0].size * itemsize
    if method.kind == SDPA:
        return Workload(_torch_sdpa(host, pass_, dtype, device), input_bytes, "torch")
    framework, why = framework_for_dtype(method, dtype)
    if framework is None:
        raise NotImplementedError(why)
    options = _yoso_options(method, num_hashes, tau)
    planes = yoso_planes(num_hashes, tau, dim, seed) if method.kind == "yoso" else None
    maker = {"numpy": _numpy_yoso, "torch": _torch_yoso, "jax": _jax_yoso}.get(framework)
    if maker is None:
        raise NotImplementedError(f"yoso bench cannot feed {framework} arrays")
    fn, note = maker(host, planes, options, pass_, dtype, device)
    return Workload(fn, input_bytes, framework, note)


def yoso_planes(num_hashes, tau, dim, seed):
    return yoso.hash_planes(num_hashes, tau, dim, seed=seed)


def _numpy_yoso(host, planes, options, pass_, dtype, device):
    q, k, v, ct = (x.astype(dtype) for x in host)
    if planes is not None:
        options = {**options, "planes": planes}
    if pass_ == "forward":
        return (lambda: yoso.attention(q, k, v, **options)), None

    def forward_backward():
        _, vjp = yoso.attention_vjp(q, k, v, **options)
        return vjp(ct)

    return forward_backward, None


def _torch_tensors(host, dtype, device):
    import torch

    return [torch.as_tensor(x, device=device).to(getattr(torch, dtype)) for x in host]


def _torch_yoso(host, planes, options, pass_, dtype, device):
    import torch

    q, k, v, ct = _torch_tensors(host, dtype, device)
    if planes is not None:
        options = {**options, "planes": torch.as_tensor(planes, device=device, dtype=torch.float32)}
    return _torch_passes(lambda q, k, v: yoso.attention(q, k, v, **options), q, k, v, ct, pass_), None


def _torch_sdpa(host, pass_, dtype, device):
    import torch.nn.functional as F

    q, k, v, ct = _torch_tensors(host, dtype, device)
    return _torch_passes(F.scaled_dot_product_attention, q, k, v, ct, pass_)


def _torch_passes(f, q, k, v, ct, pass_):
    import torch

    if pass_ == "forward":

        def forward():
            with torch.no_grad():
                return f(q, k, v)

        return forward
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def forward_backward():
        with torch.enable_grad():
            out = f(q, k, v)
            return torch.autograd.grad(out, (q, k, v), ct)

    return forward_backward


def _jax_yoso(host, planes, options, pass_, dtype, device):
    import jax

    q, k, v, ct = (to_framework(x, "jax", device, dtype) for x in host)
    args = [q, k, v]
    if planes is not None:
        args.append(to_framework(planes.astype(np.float32), "jax", device))

    def forward(q, k, v, *planes):
        return yoso.attention(q, k, v, **options, **({"planes": planes[0]} if planes else {}))

    if pass_ == "forward":
        f = forward
    else:
        args.append(ct)

        def f(q, k, v, *rest):
            *planes, cotangent = rest
            _, pull = jax.vjp(lambda q, k, v: forward(q, k, v, *planes), q, k, v)
            return pull(cotangent)

    try:  # compile ahead of time so no call being timed traces or compiles
        compiled = jax.jit(f).lower(*args).compile()
        return (lambda: compiled(*args)), "jax.jit, compiled before timing"
    except Exception as exc:  # a backend that cannot be traced is still measured, eagerly
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return (lambda: f(*args)), f"eager (jax.jit failed: {reason})"
