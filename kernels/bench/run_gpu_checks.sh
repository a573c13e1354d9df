#!/usr/bin/env bash
# One prepared GPU check for the dense attention kernel: the tests marked `gpu`, then the
# benchmark. Run from anywhere on a machine with CUDA; the repository's packages need not be
# installed (PYTHONPATH points at their sources). Logs and the benchmark table go to
# kernels/results/, and are also copied to $OUT when that variable names a folder.
#
#   kernels/bench/run_gpu_checks.sh                 # gpu tests + the benchmark's main shapes
#   kernels/bench/run_gpu_checks.sh --full          # gpu tests + the full benchmark sweep
#   kernels/bench/run_gpu_checks.sh --tests-only    # or --bench-only [--full]
#   PYTHON=/path/to/python kernels/bench/run_gpu_checks.sh
#
# Every kernel variant compiles on first use (a few seconds each), so the tests take a few
# minutes on a fresh machine; split them from the benchmark when a call's time is short.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
export PYTHONPATH="$root/kernels/src:$root/packages/core_attention/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET CORE_ATTENTION_BACKEND
results="$root/kernels/results"
stamp="$(date +%Y-%m-%d)"
run_tests=1 run_bench=1 full=0
for arg in "$@"; do
  case "$arg" in
    --full) full=1 ;;
    --tests-only) run_bench=0 ;;
    --bench-only) run_tests=0 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
tests_status=0 bench_status=0

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "run_gpu_checks: needs a CUDA GPU visible to $python; nothing run."
  exit 0
fi
mkdir -p "$results"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'

if [ "$run_tests" = 1 ]; then
  echo "== gpu tests"
  "$python" -m pytest "$root/tests/kernels/test_flash_attention.py" -m gpu -q -rs \
    -p no:cacheprovider -o addopts="" --import-mode=importlib --durations=10 2>&1 | tee "$results/$stamp-gpu-tests.log"
  tests_status=${PIPESTATUS[0]}
fi

if [ "$run_bench" = 1 ]; then
  echo "== benchmark"
  if [ "$full" = 1 ]; then
    bench_args=()
  else
    # The issue's goal shape (D 128, 8k, non-causal) plus a short sweep around it.
    bench_args=(--seqlens 1024,4096,8192,16384 --head-dims 64,128 --warmup 10 --rep 50)
  fi
  "$python" "$root/kernels/bench/bench_attention.py" "${bench_args[@]}" --out-dir "$results" \
    2>&1 | tee "$results/$stamp-bench.log"
  bench_status=${PIPESTATUS[0]}
fi

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp "$results"/"$stamp"-* "$OUT"/ 2>/dev/null || true
fi
echo "gpu tests exit $tests_status, benchmark exit $bench_status"
[ "$tests_status" = 0 ] && [ "$bench_status" = 0 ]
