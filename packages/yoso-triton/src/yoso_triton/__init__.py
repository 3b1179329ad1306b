"""yoso_triton: YOSO attention as Triton kernels on torch tensors (the ``triton`` backend).

Layout:
  kernels/     the ``@triton.jit`` kernels only (hashing, bucket sums, sampled gradients, YOSO-E)
  launch.py    thin wrappers: argument checks, block sizes, bucket sorting, kernel launches
  backend.py   the ``yoso.backends.Backend`` adapter (entry point ``triton``)

Importing this package imports neither torch nor triton; ``launch`` does, and Triton decides at that
moment whether it runs kernels on a GPU or in its interpreter (``TRITON_INTERPRET=1``, CPU tensors).
"""

__version__ = "0.1.0"
