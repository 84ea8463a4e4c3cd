#!/usr/bin/env bash
# The test suite under each MKL code path (MKL_CBWR) and ATen kernel level (ATEN_CPU_CAPABILITY): a float
# comparison that holds only for one CPU's kernels fails here on any machine. Writes one line per setting.
#   bash bench/cpu_paths.sh [pytest arguments]      (default: the whole suite)
set -uo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
settings=("MKL_CBWR=COMPATIBLE" "MKL_CBWR=SSE4_2" "MKL_CBWR=AVX2" "ATEN_CPU_CAPABILITY=default"
          "ATEN_CPU_CAPABILITY=avx2" "MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default")
grep -q avx512f /proc/cpuinfo && settings+=("MKL_CBWR=AVX512")
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(date -u +%F)"
failed=0
for setting in "${settings[@]}"; do
  line=$(env $setting python -m pytest -q -p no:cacheprovider "$@" 2>&1 | grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed)')
  echo "$setting: $line"
  grep -q -E '^(FAILED|ERROR)| failed' <<<"$line" && failed=1
done
exit $failed
