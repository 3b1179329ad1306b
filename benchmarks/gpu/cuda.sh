#!/usr/bin/env bash
# The whole GPU check of the `cuda` backend (yoso-cuda), in one call, on a machine with an NVIDIA GPU
# (sm_80+) whose python3 already has a CUDA build of torch, cuda-bindings and nvidia-cuda-nvrtc
# (no network needed: only this repository's packages are installed, without dependencies).
#
#   bash benchmarks/gpu/cuda.sh            # everything: install, build, tests, sanitizers, forms, benchmark
#   bash benchmarks/gpu/cuda.sh sanitize   # one step: install | build | conformance | sanitize | forms | bench
#
# Results go to $OUT (default: bench-out/), one file per step. Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 YOSO_CUDA_CACHE_DIR="${YOSO_CUDA_CACHE_DIR:-$PWD/.yoso-cuda-cache}"
failed=()

run() {  # run NAME COMMAND...: log to $OUT/NAME.txt, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; failed+=("$name"); }
}

install() {
  local pkgs=(-e packages/yoso-reference -e packages/yoso-api -e packages/yoso-bench -e packages/yoso-cuda)
  [ -d packages/yoso-triton ] && pkgs+=(-e packages/yoso-triton)
  run install "$PY" -m pip install -q --no-deps --no-build-isolation "${pkgs[@]}"
  { nvidia-smi; "$PY" -m pip list 2>/dev/null | grep -Ei "^(torch|triton|cuda|nvidia-cuda-nvrtc|numpy) "; yoso info; } \
    > "$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt"
}

build() {  # every instantiation for sm_80 and sm_90, and the cache for this GPU's architecture
  local arch archs=(--arch sm_80 --arch sm_90)
  arch=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'sm_{a}{b}')")
  case "$arch" in sm_80|sm_90) ;; *) archs+=(--arch "$arch") ;; esac  # each program once per architecture
  run build "$PY" -m yoso_cuda.build "${archs[@]}" --populate-cache
}

conformance() {  # the whole suite on CUDA tensors, then the backend's own tests (GPU ones included)
  run conformance "$PY" -m pytest conformance --backend cuda --require-backend -q -p no:cacheprovider
  run cuda-tests "$PY" -m pytest packages/yoso-cuda/tests -q -p no:cacheprovider
}

sanitize() {  # every kernel family (table form included) under memcheck and racecheck: small shapes, cuda_kernels.py
  run kernels "$PY" benchmarks/gpu/cuda_kernels.py
  for tool in memcheck racecheck; do
    run "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
      "$PY" benchmarks/gpu/cuda_kernels.py
  done
}

forms() {  # the lower bound's pair and table forms and the per-bucket choice, timed (see cuda_forms.py)
  run forms "$PY" benchmarks/gpu/cuda_forms.py
}

bench() {  # the speed table (yoso bench: CUDA events, L2 flushed, fwd and fwd+bwd, peak memory)
  run bench yoso bench --backend cuda --backend triton --device cuda --dtype bfloat16 --batch 4 --heads 16 \
    --dim 64 --num-hashes 32 --hash-bits 8 --n 1024,2048,4096,8192,16384,32768,65536 --out "$OUT/cuda"
}

steps=("${@:-install build conformance sanitize forms bench}")
for step in ${steps[*]}; do
  [ "$step" = install ] || "$PY" -c "import yoso_cuda" 2>/dev/null || install
  "$step"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
