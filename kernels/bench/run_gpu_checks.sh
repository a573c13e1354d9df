#!/usr/bin/env bash
# One prepared GPU check for the dense attention kernel: the tests marked `gpu`, then the
# benchmark. Run from anywhere on a machine with CUDA; the repository's packages need not be
# installed (PYTHONPATH points at their sources). Logs and the benchmark table go to
# kernels/results/, and are also copied to $OUT when that variable names a folder.
#
#   kernels/bench/run_gpu_checks.sh            # gpu tests + the benchmark's goal shapes
#   kernels/bench/run_gpu_checks.sh --full     # gpu tests + the full benchmark sweep
#   PYTHON=/path/to/python kernels/bench/run_gpu_checks.sh
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
export PYTHONPATH="$root/kernels/src:$root/packages/core_attention/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET CORE_ATTENTION_BACKEND
results="$root/kernels/results"
mkdir -p "$results"
stamp="$(date +%Y-%m-%d)"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'

echo "== gpu tests"
"$python" -m pytest "$root/tests/kernels/test_flash_attention.py" -m gpu -q -p no:cacheprovider \
  -o addopts="" 2>&1 | tee "$results/$stamp-gpu-tests.log"
tests_status=${PIPESTATUS[0]}

echo "== benchmark"
if [ "${1:-}" = "--full" ]; then
  bench_args=()
else
  # The issue's goal shape (D 128, 8k, non-causal) plus a short sweep around it.
  bench_args=(--seqlens 1024,4096,8192,16384 --head-dims 64,128 --warmup 10 --rep 50)
fi
"$python" "$root/kernels/bench/bench_attention.py" "${bench_args[@]}" --out-dir "$results" \
  2>&1 | tee "$results/$stamp-bench.log"
bench_status=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp "$results"/"$stamp"-* "$OUT"/ 2>/dev/null || true
fi
echo "gpu tests exit $tests_status, benchmark exit $bench_status"
[ "$tests_status" = 0 ] && [ "$bench_status" = 0 ]
