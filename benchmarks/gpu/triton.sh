#!/usr/bin/env bash
# The whole GPU check of the `triton` backend, in one call, on a machine with an NVIDIA GPU:
#   1. install (the image's CUDA torch + triton if present, else a venv: torch 2.13.0 + triton 3.7.1)
#   2. the conformance suite and the kernel tests on CUDA tensors
#   3. compute-sanitizer memcheck and racecheck on the main kernels (benchmarks/gpu/triton_sanitize.py),
#      both forms of the lower-bound gradient included
#   4. the speed table: yoso bench at the issue's target shape; the two forms of the lower-bound
#      gradient, and the per-bucket choice, timed alone (benchmarks/gpu/triton_forms.py)
#
#   OUT=/path/for/results bash benchmarks/gpu/triton.sh        (default OUT: ./bench-out)
#
# Every step logs to $OUT/triton/; the script goes on after a failed step and exits non-zero at the
# end if any step failed, so one run records everything. Copy $OUT/triton into benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench-out}"
LOG="$OUT/triton"
mkdir -p "$LOG"
unset TRITON_INTERPRET  # CUDA tensors, compiled kernels
export YOSO_TEST_REQUIRE=1
failed=()
step() {  # step NAME CMD...: run, log, remember failures
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$LOG/steps.txt"
    if "$@" >"$LOG/$name.log" 2>&1; then
        echo "   ok" | tee -a "$LOG/steps.txt"
    else
        echo "   FAILED (exit $?), see $LOG/$name.log" | tee -a "$LOG/steps.txt"
        failed+=("$name")
    fi
}

# 1. install. A GPU image that already has CUDA torch and triton (and no network) keeps them: our
#    packages are added editable, without dependencies. Otherwise: a fresh venv with the pinned releases.
PY="${PYTHON:-python3}"
if "$PY" -c "import torch, triton; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    step install "$PY" -m pip install -q --no-deps --no-build-isolation -e packages/yoso-reference \
        -e packages/yoso-api -e packages/yoso-bench -e packages/yoso-triton
else
    VENV="${VENV:-.venv-gpu}"
    step install bash -c "python3 -m venv $VENV && $VENV/bin/python -m pip install -q torch==2.13.0 \
        triton==3.7.1 pytest -e packages/yoso-reference -e packages/yoso-api -e 'packages/yoso-bench[plot]' \
        -e packages/yoso-triton"
    PY="$VENV/bin/python"
fi
step info "$PY" -m yoso.cli info
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >"$LOG/versions.txt" 2>&1
nvidia-smi >"$LOG/nvidia-smi.txt" 2>&1 || true

# 2. conformance + kernel tests on CUDA tensors
step conformance "$PY" -m pytest conformance packages/yoso-triton/tests --backend triton --require-backend \
    -q -p no:cacheprovider --durations=20

# 3. compute-sanitizer on the main kernels (compile first, outside the sanitizer; no caching allocator,
#    so an out-of-bounds access cannot hide inside a pooled block)
step sanitize-warmup "$PY" benchmarks/gpu/triton_sanitize.py
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/gpu/triton_sanitize.py
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" benchmarks/gpu/triton_sanitize.py
unset PYTORCH_NO_CUDA_MEMORY_CACHING

# 4. speed table (yoso bench: forward and forward+backward vs torch SDPA, peak memory)
step bench "$PY" -m yoso.cli bench --backend triton --device cuda --dtype bfloat16 --batch 4 --heads 16 --dim 64 \
    --num-hashes 32 --hash-bits 8 --n 1024,2048,4096,8192,16384,32768,65536 --out "$OUT/triton"
step forms "$PY" benchmarks/gpu/triton_forms.py --out "$OUT/triton"

if ((${#failed[@]})); then
    echo "triton GPU check: FAILED steps: ${failed[*]}" | tee -a "$LOG/steps.txt"
    exit 1
fi
echo "triton GPU check: all steps passed; results in $LOG" | tee -a "$LOG/steps.txt"
