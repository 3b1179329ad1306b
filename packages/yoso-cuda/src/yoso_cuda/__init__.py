"""yoso_cuda: YOSO attention kernels in handwritten CUDA C++, compiled at first use with NVRTC.

The kernels are the ``.cu`` files in ``kernels/``; ``_ops`` checks arguments and launches them on
torch's current stream through the CUDA driver API (``cuda.bindings.driver``); ``backend`` exposes
them to ``yoso`` as the ``cuda`` backend. ``python -m yoso_cuda.build --arch sm_80 --arch sm_90``
compiles every kernel without a GPU (the CI build check).

Importing this package loads neither torch nor the CUDA libraries.
"""

__version__ = "0.1.0"
