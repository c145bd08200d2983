#!/usr/bin/env bash
# The reproduction with the authors' training semantics (issue 32; RESULTS.md, "Plan of 2026-12-06").
# Five arms x 3 seeds x CIFAR-10 and Imagenette, one process (one core) per dataset. Started again
# unchanged after an interruption, tools.reproduce skips finished runs and resumes the others.
cd "$(dirname "$0")/.."
py=.venv/bin/python
arms=(--arm simclr:@configs/repro_arms/simclr.yaml
      --arm simclr_suncet:@configs/repro_arms/simclr_suncet.yaml
      --arm swav:@configs/repro_arms/swav.yaml
      --arm swav_suncet:@configs/repro_arms/swav_suncet.yaml
      --arm paws:@configs/repro_arms/paws.yaml)
common=(--labeled-fraction 0.1 --epochs 6 --resolution 32 --model resnet18-small --train-subset 2000
        --seeds 0 1 2 --final-eval snn finetune --no-progress "${arms[@]}")
for ds in cifar10 imagenette; do
  data=data/cifar10-jpg; [ $ds = imagenette ] && data=data/imagenette2
  out=runs/authors_$ds
  mkdir -p $out
  ( OMP_NUM_THREADS=1 $py -m tools.reproduce --data $data --config configs/repro_$ds.yaml --out $out "${common[@]}" \
      >> $out/log.txt 2>&1
    # the reports: against simclr (the first arm), then against swav (question A)
    $py -m tools.reproduce --data $data --config configs/repro_$ds.yaml --out $out "${common[@]}" --report-only \
      > $out/report.txt 2>&1
    $py -m tools.reproduce --data $data --config configs/repro_$ds.yaml --out $out "${common[@]}" --report-only \
      --baseline swav >> $out/report.txt 2>&1 ) &
done
wait
