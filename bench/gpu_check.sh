#!/usr/bin/env bash
# GPU checks in one command, for a machine with a CUDA card and PyTorch + Lightning + torchmetrics + pytest already
# installed (nothing is downloaded). Writes everything into $OUT (default bench/results/gpu):
#   device.txt            card, driver-visible memory, torch and CUDA versions
#   gpu_tests.log         pytest -m gpu (bucket steps vs CPU, no host syncs, CUDA-graph replay, Lightning fits,
#                         the FSDP2 path on the card)
#   train_step_cuda.json  whole training steps, ALQ (eager / compiled) vs float Adam, batch 128
#   core_cuda.json        the core benchmark on the card
#   stages*.json          LeNet5 on Fashion-MNIST through Lightning, eager and compiled (needs the IDX files in
#                         $FASHION_MNIST, e.g. a copy of /usr/share/datasets/fashion-mnist carried along)
#   RESULTS.md            the tables of the benchmarks above, to merge into bench/RESULTS.md
# Usage: OUT=/some/dir FASHION_MNIST=.data/fashion-mnist bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python=${PYTHON:-python3}
status=0

"$python" - >"$out/device.txt" <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device"
props = torch.cuda.get_device_properties(0)
print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
cat "$out/device.txt" || exit 1

"$python" -m pytest -q -p no:cacheprovider -m gpu -rs tests/callbacks/test_gpu.py tests/callbacks/test_fsdp.py tests/core 2>&1 \
  | tee "$out/gpu_tests.log" || status=1

"$python" bench/bench_train_step.py --device cuda --models lenet5 vgg_small resnet20 resnet18 \
  --out "$out/train_step_cuda.json" --markdown "$out/RESULTS.md" || status=1
"$python" bench/bench_core.py --device cuda --models vgg_small resnet18 \
  --out "$out/core_cuda.json" --markdown "$out/RESULTS.md" || status=1
if [[ -n "${FASHION_MNIST:-}" ]]; then
  for flag in "" "--compile"; do
    "$python" bench/bench_stages.py --accelerator gpu --root "$FASHION_MNIST" $flag \
      --out "$out/stages_gpu${flag:+_compiled}.json" --markdown "$out/RESULTS.md" || status=1
  done
fi
exit $status
