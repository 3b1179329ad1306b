"""yoso_triton: YOSO attention as Triton kernels on torch tensors (the ``triton`` backend).

Layout:
  kernels/     the ``@triton.jit`` kernels only (hashing, bucket sums, sampled gradients, YOSO-E)
  launch.py    the primitives: block sizes, bucket sorting, kernel launches (on arguments the API checked)
  backend.py   the ``yoso.backends.Backend`` (entry point ``triton``): what it runs, and the limits it
               refuses before anything runs (``unsupported``); its primitives are launch's functions

Importing this package imports neither torch nor triton; ``launch`` does, and Triton decides at that
moment whether it runs kernels on a GPU or in its interpreter (``TRITON_INTERPRET=1``, CPU tensors).
"""

__version__ = "0.1.0"
