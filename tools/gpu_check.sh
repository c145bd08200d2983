#!/usr/bin/env bash
# One prepared call on a lent GPU machine (BENCHMARKS.md, "GPU"). The device image has Python 3.12,
# its own torch (CUDA 13), no DALI, no FFCV and no network: this script installs DALI and FFCV from
# carried wheel parts when they do not import, converts a real-JPEG Imagenette subset on the device,
# runs the CUDA tests, then tools.throughput (compute, loader, e2e; torch, DALI and FFCV backends)
# at the paper's per-GPU shapes. Every stage runs under `timeout` and prints a "[time]" line; the
# limits add up to 7 min 40 s (info 20, install 70, imports 20, data 40, CUDA tests 100, throughput
# 210 s). Writes $OUT/log.txt (or ./gpu_out) and the throughput JSON to
# benchmarks/<card>-<date>.json and $OUT.
#
# Prepared here, on a connected machine (no GPU needed):
#   make wheelhouse PY=3.12 OUT=wheelhouse-3.12/      # every wheel but torch, CPython 3.12
#   bash tools/gpu_parts.sh --wheelhouse wheelhouse-3.12
#       -> gpu_parts/1 .. gpu_parts/N (git-ignored, each < 58 MiB: the DALI cu13 wheel cut in
#          pieces, its nvidia-* libraries, the FFCV abi3 wheel, small pure wheels, data.tar with
#          2,000 train + 500 val Imagenette JPEGs) and gpu_parts/CALLS.txt
# Device calls, back to back (the machine keeps /tmp only while warm, 30 s after a call ends):
#   call 1 .. N-1: carry ["gpu_parts/<k>"]
#                  command: mkdir -p /tmp/gpu_parts && cp -a gpu_parts/<k>/. /tmp/gpu_parts/ && ls /tmp/gpu_parts | wc -l
#   call N:        carry ["gpu_parts/<N>"], timeout_s 560
#                  command: bash tools/gpu_check.sh   (copies gpu_parts/<N> itself)
# If a part is missing (the machine went cold between calls), the install stage names it and the
# script goes on without DALI/FFCV. With DALI and FFCV already importable, no parts are needed.
# Knobs: GPU_PARTS (/tmp/gpu_parts), GPU_SITE (/tmp/site), GPU_DATA (/tmp/gpu_data), PYTHON,
# GPU_STEPS (30), GPU_WINDOWS (3), GPU_WARMUP (10), GPU_DEVICE (cuda; cpu for a dry run without a GPU),
# GPU_THROUGHPUT_ARGS (extra tools.throughput arguments, e.g. "--model resnet18-small" for that dry run),
# GPU_LIMIT_SCALE (1; multiplies the stage limits, for a dry run on a slow CPU), GPU_CHECK_VARIANTS=1
# (also the compute step without channels-last and in bf16: about 100 s more), GPU_CHECK_MULTICROP=1
# (also SwAV's multi-crop, 2 x 224 + 6 x 96, on every backend: compute, loader, e2e; up to 150 s more).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PARTS=${GPU_PARTS:-/tmp/gpu_parts} SITE=${GPU_SITE:-/tmp/site} DATA=${GPU_DATA:-/tmp/gpu_data}
export PY=${PYTHON:-python3} PYTHONPATH=$PWD PYTHONUNBUFFERED=1
STEPS=${GPU_STEPS:-30} WINDOWS=${GPU_WINDOWS:-3} WARMUP=${GPU_WARMUP:-10}
DEVICE=${GPU_DEVICE:-cuda}
EXTRA_ARGS=${GPU_THROUGHPUT_ARGS:-}  # appended to each tools.throughput command (a dry run: a small model)
SCALE=${GPU_LIMIT_SCALE:-1}  # multiplies every stage's time limit (a dry run on a slow CPU)
START=$(date +%s.%N)
SUMMARY=()

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
stage() {  # stage NAME LIMIT_S COMMAND...: run under timeout, log it, print and keep a [time] line
  local name=$1 limit=$2 t rc line
  shift 2
  t=$(date +%s.%N)
  limit=$((limit * SCALE))
  echo "=== $name (limit ${limit} s)" | tee -a "$LOG"
  timeout -k 3 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  line="[time] $name: $(elapsed "$t") s, rc $rc$([ "$rc" = 124 ] && echo ' (timed out)')"
  echo "$line" | tee -a "$LOG"
  SUMMARY+=("$line")
  return "$rc"
}

info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import sys, torch, torchvision
print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__,
      'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  echo "cores $(nproc), $(ldd --version | head -1)"
}

install_parts() {  # DALI + FFCV from the carried parts, into $SITE, when they do not import
  if "$PY" -c "import nvidia.dali, ffcv" 2>/dev/null; then echo "DALI and FFCV import already"; return 0; fi
  mkdir -p "$PARTS"
  for d in gpu_parts/*/; do [ -d "$d" ] && cp -a "$d". "$PARTS"/; done
  [ -f "$PARTS/PARTS" ] || { echo "no parts in $PARTS: make the device calls in this script's header first"; return 1; }
  local missing
  missing=$(while read -r n f; do [ -f "$PARTS/$f" ] || echo "$n"; done <"$PARTS/PARTS" | sort -un | tr '\n' ' ')
  [ -z "$missing" ] || { echo "missing part(s): $missing(the machine went cold between calls?): redo those calls"; return 1; }
  for first in "$PARTS"/*.part00; do
    [ -e "$first" ] && cat "${first%.part00}".part[0-9][0-9] >"${first%.part00}"
  done
  (cd "$PARTS" && sha256sum -c --quiet SHA256SUMS) || { echo "checksum mismatch in $PARTS"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$PARTS"/*.whl || return 1
  # nvimgcodec & co ship nvidia/__init__.py; where the image's own nvidia/ is a namespace package,
  # drop ours so that both folders make one namespace (else ours would hide the image's).
  local purelib
  purelib=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  [ -f "$purelib/nvidia/__init__.py" ] || rm -f "$SITE/nvidia/__init__.py"
  echo "installed $(ls "$PARTS"/*.whl | wc -l) wheels into $SITE ($(du -sh "$SITE" | cut -f1))"
}

prepare_data() {  # $1: converter formats (ffcv,dali / dali / ffcv / empty)
  rm -rf "$DATA" && mkdir -p "$DATA"
  tar xf "$PARTS/data.tar" -C "$DATA" || return 1
  echo "train $(find "$DATA/imagenette2/train" -type f | wc -l) / val $(find "$DATA/imagenette2/val" -type f | wc -l) JPEGs"
  [ -z "$1" ] && return 0
  "$PY" -m tools.convert_imagenet --src "$DATA/imagenette2" --out "$DATA/converted" --formats "$1" \
    --labeled-fraction 0.1 --shard-size 256 --shard-multiple 8 --jobs "$(nproc)" --no-progress
}
export -f install_parts prepare_data

stage info 20 bash -c "$(declare -f info); info"
stage install 70 bash -c install_parts && export PYTHONPATH=$SITE:$PWD
stage imports 20 "$PY" -c "import torch, nvidia.dali, ffcv, importlib.metadata as m
print('torch', torch.__version__, 'dali', nvidia.dali.__version__, 'ffcv', m.version('ffcv'), ffcv.__file__)"

BACKENDS=(torch)
"$PY" -c "import nvidia.dali" 2>/dev/null && BACKENDS+=(dali)
"$PY" -c "import ffcv" 2>/dev/null && BACKENDS+=(ffcv)
FORMATS=$(printf '%s\n' "${BACKENDS[@]}" | grep -v torch | tac | paste -sd, -)
echo "backends: ${BACKENDS[*]}" | tee -a "$LOG"

stage data 40 bash -c "prepare_data '$FORMATS'"

# CUDA tests: fp16 losses vs float64, BatchColorAugment CUDA vs CPU, a tiny fp16 AMP training run,
# DALI mixed decode vs CPU (whatever exists: selected by name).
stage cuda-tests 100 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -k "cuda or gpu" tests/

CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z ' 'a-z-')
JSON=benchmarks/${CARD:-cpu}-$(date -u +%Y-%m-%d).json
mkdir -p benchmarks
THROUGHPUT=(-m tools.throughput --device "$DEVICE" --config configs/imagenet_10pct_suncet.yaml
  --set data.support_classes=10 --set data.support_images_per_class=4 --set run.knn_every_epochs=0 --resolution 224
  --data "$DATA/imagenette2" --data-for "dali=$DATA/converted" --data-for "ffcv=$DATA/converted"
  --steps "$STEPS" --windows "$WINDOWS" --warmup "$WARMUP")
if [ ${#BACKENDS[@]} = 3 ]; then
  stage throughput 210 "$PY" "${THROUGHPUT[@]}" --mode compute,loader,e2e --backend all --json "$JSON" $EXTRA_ARGS
  [ -f "$JSON" ] && cp "$JSON" "$OUT/"
else  # a backend is missing: the compute step once, then each backend that imports
  modes=compute,loader,e2e
  for b in "${BACKENDS[@]}"; do
    stage "throughput-$b" $((210 / ${#BACKENDS[@]})) "$PY" "${THROUGHPUT[@]}" --mode "$modes" --backend "$b" \
      --json "${JSON%.json}-$b.json" $EXTRA_ARGS
    [ -f "${JSON%.json}-$b.json" ] && cp "${JSON%.json}-$b.json" "$OUT/"
    modes=loader,e2e
  done
fi

# Optional (GPU_CHECK_VARIANTS=1, beyond the 8 minutes): what channels-last and fp16 buy.
if [ "${GPU_CHECK_VARIANTS:-0}" = 1 ]; then
  stage compute-nchw 50 "$PY" "${THROUGHPUT[@]}" --mode compute --set model.channels_last=false \
    --json "$OUT/compute_nchw.json" $EXTRA_ARGS
  stage compute-bf16 50 "$PY" "${THROUGHPUT[@]}" --mode compute --precision bf16 --json "$OUT/compute_bf16.json" $EXTRA_ARGS
fi

# Optional (GPU_CHECK_MULTICROP=1): the multi-crop shape of SwAV and PAWS, against the run above.
if [ "${GPU_CHECK_MULTICROP:-0}" = 1 ]; then
  MULTI=${JSON%.json}-multicrop.json
  stage throughput-multicrop 150 "$PY" "${THROUGHPUT[@]}" --mode compute,loader,e2e \
    --backend "$(IFS=,; [ ${#BACKENDS[@]} = 3 ] && echo all || echo "${BACKENDS[0]}")" \
    --views 2x224:0.14-1,6x96:0.05-0.14 --json "$MULTI" $EXTRA_ARGS
  [ -f "$MULTI" ] && cp "$MULTI" "$OUT/"
fi

{
  echo "=== summary (backends ${BACKENDS[*]}; json under benchmarks/ and $OUT)"
  printf '%s\n' "${SUMMARY[@]}"
  echo "[time] total: $(elapsed "$START") s"
} | tee -a "$LOG"
