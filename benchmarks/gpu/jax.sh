#!/usr/bin/env bash
# The jax backend on a GPU: the conformance suite on GPU arrays, then the benchmark.
#
# UNVERIFIED: written without access to a GPU. Every command here is what should run; none of it has
# been run on one. Expect the Pallas kernels (Triton lowering) to need fixes on first contact.
#
#   OUT=/some/dir bash benchmarks/gpu/jax.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results}

python -m venv .venv-gpu-jax
. .venv-gpu-jax/bin/activate
# jax with CUDA 12 wheels (same version as CI's CPU runs); a CPU torch for the oracle and SDPA rows.
pip install "jax[cuda12]==0.10.2" torch==2.13.0 pytest \
    -e packages/yoso-reference -e "packages/yoso-api[plot]" -e packages/yoso-jax
yoso info  # the jax backend should list a cuda device; its default device is then the GPU

# Conformance on GPU arrays: conftest places the jax target's arrays on backend.default_device().
# Both levels: XLA (scatter/gather) and Pallas (compiled through Triton, not interpreted, on a GPU).
for impl in xla pallas; do
    YOSO_JAX_IMPL=$impl pytest conformance --backend jax --require-backend
    # float64: XLA on GPU supports it; the Pallas kernels' float64 dots are untested on Triton.
    YOSO_JAX_IMPL=$impl JAX_ENABLE_X64=1 pytest conformance --backend jax --require-backend
done
pytest packages/yoso-jax/tests

# Speed (yoso bench is the project's benchmark command).
for impl in xla pallas; do
    YOSO_JAX_IMPL=$impl yoso bench --backend jax --device cuda --dtype bfloat16 --batch 4 --heads 16 --dim 64 \
        --n 1024,2048,4096,8192,16384,32768,65536 --out "$OUT/jax-$impl"
done
