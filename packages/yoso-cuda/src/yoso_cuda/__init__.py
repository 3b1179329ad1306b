"""yoso_cuda: YOSO attention kernels in handwritten CUDA C++, compiled at first use with NVRTC.

The kernels are the ``.cu`` files in ``kernels/``; ``_ops`` configures and launches them on torch's
current stream through the CUDA driver API (``cuda.bindings.driver``), on arguments the API has
already checked; ``backend`` exposes them to ``yoso`` as the ``cuda`` backend and refuses, before
anything runs, the calls the kernels cannot run (``CudaBackend.unsupported``).
``python -m yoso_cuda.build --arch sm_80 --arch sm_90`` compiles every kernel without a GPU (the CI
build check).

Importing this package loads neither torch nor the CUDA libraries.
"""

__version__ = "0.1.0"
