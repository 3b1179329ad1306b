"""The one documented hook for code that tests or measures backends (the conformance suite, ``yoso bench``).

Nothing here is needed to *use* yoso. It moves NumPy data into a backend's framework and back, says which
caller framework reaches a backend most directly, waits for devices (timing), and exposes the constant the
API passes to the gradient primitives, so that kernel-level tests can call a backend's primitives exactly as
the API does.
"""

from __future__ import annotations

import numpy as np

from ._core import max_ratio

__all__ = [
    "framework_for",
    "max_ratio",
    "synchronize",
    "to_framework",
    "to_numpy",
]


def framework_for(backend) -> str:
    """The caller-side array type that reaches ``backend`` most directly."""
    return backend.framework if backend.framework in backend.frameworks else backend.frameworks[0]


def to_framework(x: np.ndarray, framework: str, device: str = "cpu", dtype: str | None = None):
    """``x`` as a ``framework`` array on ``device`` (cast to ``dtype`` if given)."""
    if framework == "numpy":
        return x if dtype is None else x.astype(dtype)
    if framework == "torch":
        import torch

        # A copy in memory torch allocates (64-byte aligned, like a model's tensors), not a view of NumPy's
        # 16-byte aligned buffer, which JAX would copy at every crossing (a backend computing on JAX arrays).
        t = torch.tensor(x, device=device)
        return t if dtype is None else t.to(getattr(torch, dtype))
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        a = jax.device_put(jnp.asarray(x), jax.devices(device.split(":")[0])[0])
        return a if dtype is None else a.astype(dtype)
    raise ValueError(f"unknown framework {framework!r}")


def to_numpy(x) -> np.ndarray:
    """Any framework's array as a NumPy array (float64 for floating arrays)."""
    if isinstance(x, np.ndarray):
        out = x
    elif type(x).__module__.startswith("torch"):
        out = x.detach().cpu()
        out = (out.double() if out.is_floating_point() else out).numpy()
    else:
        out = np.asarray(x)
        if out.dtype.name == "bfloat16":  # JAX's bfloat16 (ml_dtypes) is not a NumPy floating type
            out = out.astype(np.float32)
    return out.astype(np.float64) if np.issubdtype(out.dtype, np.floating) else out


def synchronize(x) -> None:
    """Wait until the device has produced ``x`` (for timing)."""
    if type(x).__module__.startswith("torch"):
        import torch

        if x.is_cuda:
            torch.cuda.synchronize(x.device)
    elif hasattr(x, "block_until_ready"):
        x.block_until_ready()
