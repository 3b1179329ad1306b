"""yoso-jax: YOSO attention on JAX arrays -- two backends of ``yoso``.

Use them through ``yoso.attention`` on JAX arrays (jit, vmap and grad work; pass ``key=`` for fresh
hash functions per call). Both compute the same thing; choose one like any backend, with
``yoso.set_backend`` or ``YOSO_BACKEND``:

* ``jax`` (``yoso_jax.xla``): ``jax.numpy``/``lax`` -- scatter-add/gather hash tables; the fast CPU path
  and the default for JAX arrays.
* ``pallas`` (``yoso_jax.pallas``): Pallas kernels for hashing and cumulation (one-hot tensor-core
  matmuls, no atomics), compiled through Triton on GPUs and run with ``interpret=True`` elsewhere (slow:
  for testing).

YOSO-E, the sampled true gradient (``backward="exact"``) and the pieces around the hot loops are shared
``jax.numpy`` code (``yoso_jax.pairwise``). The lower-bound gradient has a pair and a table form: on
``jax`` the table form is ``yoso_jax.tables`` (sorted tokens, batched matmuls), on ``pallas`` two
cumulations of outer products on its kernels.
"""

from __future__ import annotations

__version__ = "0.1.0"
