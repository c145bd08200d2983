#!/usr/bin/env bash
# One short call on a lent GPU machine (about 4 minutes) (see BENCHMARKS.md, "GPU"): runs the GPU
# code paths and tools/throughput.py, writing log.txt and JSON reports to $OUT (or ./gpu_out;
# the device tool returns at most 8 files).
# The device image has its own torch/torchvision (no DALI, no FFCV).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
  nproc
} 2>&1 | tee -a "$OUT/log.txt"

# 1. GPU code paths under test: losses, batched augmentation on CUDA, model, a tiny fp16 AMP training run.
timeout 150 $PY -m pytest -q -p no:cacheprovider -k cuda tests/test_losses.py tests/test_batch_augment.py \
  tests/test_pretrain.py 2>&1 | tail -15 | tee -a "$OUT/log.txt"

# 2. Compute ceiling: ResNet-50, the paper's per-GPU batch (44 x 2 views + 20 x 2 support, 224 px), fp16 AMP, channels-last.
timeout 110 $PY -m tools.throughput --mode compute --config configs/imagenet_10pct_suncet.yaml \
  --steps 30 --warmup 10 --json "$OUT/compute.json" 2>&1 | tail -25 | tee -a "$OUT/log.txt"

# 3. Batched GPU colour augmentation on the same shapes.
timeout 50 $PY -m tools.throughput --mode augment --config configs/imagenet_10pct_suncet.yaml \
  --steps 30 --warmup 5 --json "$OUT/augment.json" 2>&1 | tail -15 | tee -a "$OUT/log.txt"

# 4. Reference torchvision loader feeding the GPU (16 CPU workers) on generated 224 px JPEGs: loader, e2e, verdict.
$PY -c "
from pathlib import Path
from tests.helpers.imagefolder import make_image_folder
make_image_folder(Path('/tmp/gpu_data/train'), 20, 60, 256, seed=0)
make_image_folder(Path('/tmp/gpu_data/val'), 20, 5, 256, seed=1)
"
timeout 130 $PY -m tools.throughput --mode loader,e2e --backend torch --data /tmp/gpu_data \
  --config configs/imagenet_10pct_suncet.yaml --set data.num_workers=14 --set data.labeled_fraction=0.2 \
  --steps 40 --warmup 5 --json "$OUT/torch_loader.json" 2>&1 | tail -25 | tee -a "$OUT/log.txt"

# 5. What channels-last and fp16 buy: the compute step without channels-last, and in bf16.
if [ "${GPU_CHECK_VARIANTS:-1}" = 1 ]; then
  timeout 60 $PY -m tools.throughput --mode compute --config configs/imagenet_10pct_suncet.yaml --steps 20 --warmup 5 \
    --set model.channels_last=false --json "$OUT/compute_nchw.json" 2>&1 | grep "| compute" | tee -a "$OUT/log.txt"
  timeout 60 $PY -m tools.throughput --mode compute --config configs/imagenet_10pct_suncet.yaml --steps 20 --warmup 5 \
    --precision bf16 --json "$OUT/compute_bf16.json" 2>&1 | grep "| compute" | tee -a "$OUT/log.txt"
fi
