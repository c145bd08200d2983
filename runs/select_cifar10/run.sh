#!/usr/bin/env bash
# Step 1 of RESULTS.md's plan: choose the K=2 default on 1,000 held-out CIFAR-10 train images.
cd "$(dirname "$0")/../.."
common=(--data data/cifar10-jpg --config configs/repro_cifar10.yaml --labeled-fraction 0.1 --epochs 8
        --resolution 32 --model resnet18-small --train-subset 3000 --holdout 1000 --out runs/select_cifar10
        --arm simclr:loss.suncet_weight=0 --arm k2: --arm k2_paper:loss.suncet_weight_rule=paper_ratio
        --arm k2_v2:data.support_views=2 --arm k2_v2_paper:data.support_views=2,loss.suncet_weight_rule=paper_ratio
        --final-eval --no-progress)
for seed in 0 1; do
  OMP_NUM_THREADS=1 .venv/bin/python -m tools.reproduce "${common[@]}" --seeds $seed > runs/select_cifar10/log_seed$seed.txt 2>&1 &
done
wait
.venv/bin/python -m tools.reproduce "${common[@]}" --seeds 0 1 --report-only > runs/select_cifar10/report.txt 2>&1
