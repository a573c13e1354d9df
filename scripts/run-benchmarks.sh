#!/usr/bin/env bash
# Run every package's CPU benchmark scripts (bench/bench_*.py); each prints its own table.
# GPU-only benchmarks exit early with a line saying so when CUDA is absent.
set -euo pipefail
python="$1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
shopt -s nullglob
found=0
for script in kernels/bench/bench_*.py packages/*/bench/bench_*.py apps/*/bench/bench_*.py; do
  found=1
  echo "== $script"
  "$python" "$script"
done
[ "$found" = 1 ] || echo "bench: no benchmark scripts yet"
