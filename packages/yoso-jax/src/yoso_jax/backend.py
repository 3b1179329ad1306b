"""The ``jax`` and ``pallas`` backends: yoso's primitives on JAX arrays.

Only ``yoso`` loads this module (entry points ``yoso.backends``); it imports no JAX until a backend is
asked whether it can run or what it computes on. The primitives live in ``yoso_jax.xla`` and
``yoso_jax.pallas`` (``Backend.module``), imported on the first call.
"""

from __future__ import annotations

from importlib import metadata

from yoso.backends import Backend

from . import __version__

_HALF_AND_SINGLE = ("float16", "bfloat16", "float32")


class JaxBackend(Backend):
    name = "jax"
    priority = 10
    framework = "jax"
    # NumPy arrays and CPU torch tensors too: the API's glue hands them over without a copy and runs the
    # compiled core here -- the fast CPU path for every framework.
    frameworks = ("jax", "numpy", "torch")
    devices = ("cpu", "cuda")
    module = "yoso_jax.xla"
    has_tables = True  # bucket_tables / read_buckets: docs/math.md#bucket-tables
    lower_bound_forms = ("pairs", "tables")  # sampled_grads(form=...): docs/math.md#lower-bound
    description = "JAX (XLA): scatter/gather hash tables in jax.numpy, the fast CPU path; float64 needs jax_enable_x64"

    def serves(self, call) -> bool:
        # GPU arrays of other frameworks would cross allocators (JAX's and torch's); unverified: CPU only.
        return super().serves(call) and (call.framework == "jax" or call.device == "cpu")

    def unsupported(self, call) -> str | None:
        if call.framework != "jax" and call.device != "cpu":
            return (
                f"the {self.name!r} backend serves {call.framework} arrays on the CPU only, got device {call.device!r}"
            )
        return super().unsupported(call)

    @property
    def dtypes(self) -> tuple[str, ...]:
        try:
            import jax
        except ImportError:
            return _HALF_AND_SINGLE
        return _HALF_AND_SINGLE + (("float64",) if jax.config.jax_enable_x64 else ())

    def availability(self) -> str | None:
        try:
            import jax  # noqa: F401
        except ImportError as exc:
            return f"jax is not installed ({exc}); pip install yoso-jax"
        return None

    def missing_features(self) -> list[str]:
        return [f"{m} (needs jax_enable_x64)" if m == "dtype float64" else m for m in super().missing_features()]

    def version(self) -> str:
        try:
            jax_version = metadata.version("jax")
        except metadata.PackageNotFoundError:
            jax_version = "-"
        return f"{__version__} (jax {jax_version})"

    def device_names(self) -> list[str]:
        import jax

        return [f"{d.platform}:{d.id} ({d.device_kind})" for d in jax.devices()]

    def default_device(self) -> str:
        import jax

        return "cuda" if jax.default_backend() == "gpu" else jax.default_backend()


class PallasBackend(JaxBackend):
    name = "pallas"
    priority = 5  # unverified on GPUs, and interpreted (slow) everywhere else: never preferred to `jax`
    module = "yoso_jax.pallas"
    description = (
        "JAX Pallas kernels (one-hot matmuls, no atomics) for hashing and cumulation; compiled through "
        "Triton on GPUs (unverified), interpret=True elsewhere (slow: for tests)"
    )

    def availability(self) -> str | None:
        reason = super().availability()
        if reason is not None:
            return reason
        try:
            from jax.experimental import pallas  # noqa: F401
        except ImportError as exc:
            return f"this jax has no Pallas ({exc})"
        return None

    def device_names(self) -> list[str]:
        from .pallas import interpret

        mode = " (interpret=True)" if interpret() else ""
        return [name + mode for name in super().device_names()]
