#!/usr/bin/env bash
# The whole GPU check and benchmark of yoso, in one call, on a lent GPU machine (H100/H200 image:
# python3 with CUDA torch, triton, jax, cuda-bindings; no network):
#
#   bash benchmarks/gpu/all.sh                  # triton, cuda, jax: conformance, sanitizers, yoso bench
#   bash benchmarks/gpu/all.sh triton cuda      # only some backends (each is also its own script)
#
# Every backend's script keeps going after a failed step and logs each step. Logs and results are
# collected under $WORK (default /tmp/yoso-gpu) and packed into ONE file, $OUT/yoso-gpu-results.tgz
# (the device tool returns at most 8 files from $OUT), plus $OUT/summary.txt. Unpack the archive into
# benchmarks/results/<date>-<gpu>/ and commit the bench.json/PNG files with the device name, versions,
# command and date they record. One device call runs for at most 10 minutes: if everything does not fit,
# call this once per backend.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench-out}"
WORK="${WORK:-/tmp/yoso-gpu}"
mkdir -p "$OUT" "$WORK"
parts=("$@")
((${#parts[@]})) || parts=(triton cuda jax)
status=0
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
} >"$WORK/machine.txt"
for part in "${parts[@]}"; do
    case "$part" in
    triton | jax) OUT="$WORK" bash "benchmarks/gpu/$part.sh" || status=1 ;;
    cuda) OUT="$WORK/cuda" bash benchmarks/gpu/cuda.sh || status=1 ;;
    *) echo "unknown part $part (triton, cuda, jax)" >&2; status=2 ;;
    esac
done
{
    cat "$WORK/machine.txt"
    cat "$WORK"/triton/steps.txt "$WORK"/jax/steps.txt 2>/dev/null
    grep -h "^=== .*FAILED\|^===" "$WORK"/cuda/*.txt 2>/dev/null | head -40
    echo "overall exit status: $status"
} >"$OUT/summary.txt"
tar czf "$OUT/yoso-gpu-results.tgz" -C "$WORK" .
cat "$OUT/summary.txt"
exit $status
