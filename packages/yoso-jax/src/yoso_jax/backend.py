"""The ``jax`` backend: yoso's primitives on JAX arrays, at the implementation level in use.

Only ``yoso`` loads this module (entry point ``yoso.backends``). JAX is imported when the backend is
first asked to compute or describe its devices, never at ``import yoso``.
"""

from __future__ import annotations

from importlib import metadata

from yoso.backends import Backend

from . import IMPL_ENV_VAR, __version__, implementation

_HALF_AND_SINGLE = ("float16", "bfloat16", "float32")


def _x64_enabled() -> bool:
    import jax

    return bool(jax.config.jax_enable_x64)


class JaxBackend(Backend):
    name = "jax"
    priority = 10
    framework = "jax"
    frameworks = ("jax",)
    devices = ("cpu", "cuda")

    @property
    def description(self) -> str:
        try:
            level = implementation()
        except ValueError as exc:
            level = f"invalid ({exc})"
        return (
            f"JAX, implementation level {level!r} (choose with {IMPL_ENV_VAR}=xla|pallas; Pallas runs with "
            "interpret=True off-GPU); float64 needs jax_enable_x64"
        )

    @property
    def dtypes(self) -> tuple[str, ...]:
        try:
            return _HALF_AND_SINGLE + (("float64",) if _x64_enabled() else ())
        except ImportError:
            return _HALF_AND_SINGLE

    def availability(self) -> str | None:
        try:
            import jax  # noqa: F401
            from jax.experimental import pallas  # noqa: F401
        except ImportError as exc:
            return f"jax is not installed ({exc}); pip install yoso-jax"
        try:
            implementation()
        except ValueError as exc:
            return str(exc)
        return None

    def missing_features(self) -> list[str]:
        return [f"{m} (needs jax_enable_x64)" if m == "dtype float64" else m for m in super().missing_features()]

    def version(self) -> str:
        try:
            jax_version = metadata.version("jax")
        except metadata.PackageNotFoundError:
            jax_version = "-"
        return f"{__version__} (jax {jax_version}, level {self.trace_key()})"

    def trace_key(self) -> str:
        """Read by the JAX glue at trace time: a change of level retraces instead of reusing a compiled call."""
        try:
            return implementation()
        except ValueError:
            return "invalid"

    def device_names(self) -> list[str]:
        import jax

        return [f"{d.platform}:{d.id} ({d.device_kind})" for d in jax.devices()]

    def default_device(self) -> str:
        import jax

        return "cuda" if jax.default_backend() == "gpu" else jax.default_backend()

    # ---- primitives --------------------------------------------------------------------------------

    @staticmethod
    def _level():
        if implementation() == "pallas":
            from . import pallas as level
        else:
            from . import xla as level
        return level

    def hash_codes(self, x, planes, *, hashing, num_hashes, hash_bits):
        return self._level().hash_codes(x, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)

    def cumulate(self, read_codes, write_codes, values, *, read_mask, write_mask, order, hash_bits):
        return self._level().cumulate(
            read_codes, write_codes, values, read_mask, write_mask, order=order, hash_bits=hash_bits
        )

    def sampled_grads(
        self, q_codes, k_codes, q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, backward, max_ratio
    ):
        from . import pairwise

        if backward not in ("lower_bound", "exact"):
            raise ValueError(f"backward must be 'lower_bound' or 'exact', got {backward!r}")
        level = self._level()
        args = (q_codes, k_codes, q, k, v, grad, query_mask, key_mask)
        if backward == "lower_bound" and max(q.shape[1], k.shape[1]) > level.DENSE_LOWER_BOUND_MAX_N:
            return pairwise.lower_bound_grads(*args, cumulate=level.cumulate, causal=causal, hash_bits=hash_bits)
        return pairwise.dense_sampled_grads(
            *args, causal=causal, hash_bits=hash_bits, backward=backward, max_ratio=float(max_ratio)
        )

    def expectation_forward(self, q, k, v, *, query_mask, key_mask, causal, hash_bits):
        from . import pairwise

        return pairwise.expectation_forward(q, k, v, query_mask, key_mask, causal=causal, hash_bits=hash_bits)

    def expectation_backward(self, q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, backward, max_ratio):
        from . import pairwise

        return pairwise.expectation_backward(
            q,
            k,
            v,
            grad,
            query_mask,
            key_mask,
            causal=causal,
            hash_bits=hash_bits,
            backward=backward,
            max_ratio=float(max_ratio),
        )
