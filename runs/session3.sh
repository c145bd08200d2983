#!/usr/bin/env bash
# Step 1 (rest) and step 2 of RESULTS.md's plan, as amended on 2026-11-30 09:34.
cd "$(dirname "$0")/.."
py=.venv/bin/python
sel=(--data data/cifar10-jpg --config configs/repro_cifar10.yaml --labeled-fraction 0.1 --epochs 8
     --resolution 32 --model resnet18-small --train-subset 3000 --holdout 1000 --out runs/select_cifar10
     --arm simclr:loss.suncet_weight=0 --arm k2: --arm k2_paper:loss.suncet_weight_rule=paper_ratio
     --arm k2_v2_paper:data.support_views=2,loss.suncet_weight_rule=paper_ratio
     --final-eval --no-progress)
for seed in 0 1; do
  OMP_NUM_THREADS=1 $py -m tools.reproduce "${sel[@]}" --seeds $seed >> runs/select_cifar10/log_seed$seed.txt 2>&1 &
done
wait
$py -m tools.reproduce "${sel[@]}" --seeds 0 1 --report-only > runs/select_cifar10/report.txt 2>&1
# The step-1 rule: highest mean held-out kNN after the last epoch; an arm within 0.5 points of a
# simpler one loses to it (simplicity: k2, k2_paper, k2_v2_paper).
k2=$($py - <<'PY'
import json
arms = {"k2": "", "k2_paper": "loss.suncet_weight_rule=paper_ratio",
        "k2_v2_paper": "data.support_views=2,loss.suncet_weight_rule=paper_ratio"}
mean = {a: sum(json.load(open(f"runs/select_cifar10/seed{s}/{a}/summary.json"))["knn_top1"] for s in (0, 1)) / 2
        for a in arms}
top = max(mean.values())
chosen = next(a for a in arms if mean[a] >= top - 0.5)
with open("runs/select_cifar10/decision.txt", "w") as f:
    f.write("".join(f"{a}: mean final held-out kNN top-1 {m:.2f}\n" for a, m in mean.items()))
    f.write(f"chosen: {chosen} ({arms[chosen] or 'no overrides'})\n")
print(arms[chosen])
PY
)
sep=${k2:+,}
arms=(--arm simclr:loss.suncet_weight=0
      --arm "k2:${k2}"
      --arm k6:data.support_images_per_class=6,data.support_views=1,loss.suncet_weight_rule=fixed,loss.suncet_weight=1.0
      --arm "k2_half:${k2}${sep}loss.supervised_epochs=3")
common=(--labeled-fraction 0.1 --epochs 6 --resolution 32 --model resnet18-small --train-subset 2000
        --seeds 0 1 2 --final-eval --no-progress "${arms[@]}")
OMP_NUM_THREADS=1 $py -m tools.reproduce --data data/cifar10-jpg --config configs/repro_cifar10.yaml \
  --out runs/repro3_cifar10 "${common[@]}" > runs/repro3_cifar10.log 2>&1 &
OMP_NUM_THREADS=1 $py -m tools.reproduce --data data/imagenette2 --config configs/repro_imagenette.yaml \
  --out runs/repro3_imagenette "${common[@]}" > runs/repro3_imagenette.log 2>&1 &
wait
