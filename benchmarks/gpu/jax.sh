#!/usr/bin/env bash
# The jax backend on a GPU: the conformance suite on GPU arrays (both levels), the backend's own tests,
# and the benchmark.
#
# UNVERIFIED: written without access to a GPU. Every command here is what should run; none of it has
# been run on one. The lent GPU image has no network and its own jax (0.11.x with the CUDA 13 plugin);
# yoso-jax is written and tested against 0.10.2, so expect the Pallas kernels (Triton lowering) to need
# fixes on first contact. Our packages are installed without dependencies into the image's python3.
#
#   OUT=/some/dir bash benchmarks/gpu/jax.sh        (default OUT: ./bench-out; logs go to $OUT/jax/)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench-out}"
LOG="$OUT/jax"
PY="${PYTHON:-python3}"
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 YOSO_TEST_REQUIRE=1
failed=()
step() {  # step NAME CMD...: run, log to $LOG/NAME.log, remember failures
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$LOG/steps.txt"
    if "$@" >"$LOG/$name.log" 2>&1; then echo "   ok" | tee -a "$LOG/steps.txt"; else
        echo "   FAILED (exit $?), see $LOG/$name.log" | tee -a "$LOG/steps.txt"
        failed+=("$name")
    fi
}

step install "$PY" -m pip install -q --no-deps --no-build-isolation -e packages/yoso-reference \
    -e packages/yoso-api -e packages/yoso-bench -e packages/yoso-jax
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" >"$LOG/versions.txt" 2>&1
step info "$PY" -m yoso.cli info  # the jax backend should list a cuda device; its default device is then the GPU

# Conformance on GPU arrays (conftest places the jax target's arrays on backend.default_device()):
# both backends -- jax (XLA scatter/gather) and pallas (compiled through Triton, not interpreted, on a
# GPU) -- in float32, and jax in float64 too.
for backend in jax pallas; do
    step "conformance-$backend-f32" env YOSO_TEST_DTYPE=float32 \
        "$PY" -m pytest conformance --backend $backend --require-backend -q -p no:cacheprovider
done
step conformance-jax-f64 env JAX_ENABLE_X64=1 \
    "$PY" -m pytest conformance --backend jax --require-backend -q -p no:cacheprovider
step jax-tests "$PY" -m pytest packages/yoso-jax/tests -q -p no:cacheprovider

# Speed (yoso bench is the project's benchmark command).
for backend in jax pallas; do
    step "bench-$backend" "$PY" -m yoso.cli bench --backend $backend --device cuda --dtype bfloat16 \
        --batch 4 --heads 16 --dim 64 --num-hashes 32 --hash-bits 8 --n 1024,2048,4096,8192,16384,32768,65536 \
        --out "$LOG/bench-$backend"
done

if ((${#failed[@]})); then
    echo "jax GPU check: FAILED steps: ${failed[*]}" | tee -a "$LOG/steps.txt"
    exit 1
fi
echo "jax GPU check: all steps passed; results in $LOG" | tee -a "$LOG/steps.txt"
