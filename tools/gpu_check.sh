#!/usr/bin/env bash
# The prepared GPU check (BENCHMARKS.md, "GPU check"). A lent GPU machine has Python 3.12, its own
# torch (CUDA 13), no DALI, no FFCV and no network, and a call carries at most 64 MiB; a session has
# 15 minutes of device time, the machine's start and idle time included. So the first call returns
# the compute and e2e figures (and the CUDA tests) within about 5 minutes, start included, and the
# rest is optional.
# Every stage runs under `timeout` and prints a "[time]" line; tools.throughput writes its JSON after
# every measurement, so a stage stopped by its limit keeps what it measured. Writes $OUT/log.txt and
# one JSON per stage in $OUT (./gpu_out off the device). Exit 0 when every stage passed.
#
# Parts (tools/gpu_parts.sh, made on a connected machine): gpu_parts/1 (< 40 MiB) holds FFCV with its
# small wheels and data.tar (2,000 Imagenette train JPEGs); gpu_parts/2..N hold DALI (about 260 MB).
#
# Phase 1 (default): carry ["gpu_parts/1"], timeout_s 300. Stage limits (s), 290 in all (each
# stage's expected time on the GPU, an estimate from the H200 run of 2026-11-28, in brackets):
#   info 15 [5] | install 25 [10]: FFCV from part 1, where ffcv does not import
#   compute-simclr 30 [20], compute-swav 35 [30], compute-paws 35 [30]: SimCLR + SuNCEt, SwAV + SuNCEt
#     and PAWS at the paper's per-GPU shapes, each as configured (config), foreach and foreach+nosync,
#     timed in turns (one stage each: a stage stopped by its limit costs one objective's figures);
#     the first GPU decides the compute.* defaults
#   data 30 [15]: part 1's data.tar converted on the device (.beton; DALI shards where DALI imports)
#   e2e 70 [45]: FFCV (and DALI where it imports) at 2 x 224 + 6 x 96 (configs/imagenet_multicrop.yaml),
#     with that step's compute-only figure for the verdict
#   cuda-tests 50 [35]: tests/test_cuda_check.py (each objective's AMP channels-last step and FFCV's
#     device colour stage against the CPU) and the older CUDA tests
#   So the call returns in about 3 minutes (5 at most) after the machine's start (a minute or two):
#   the compute and e2e figures within about 5 minutes of the loan, 6 to 7 if every limit is reached.
# Phase 2 (optional, GPU_PHASE=2, the same carry, timeout_s 480; only with 9 minutes left): install
#   25 and data 30 (done already on a warm machine) | switches 180 (bf16, channels-first, compile,
#   CUDA graphs against config) | augment 25 | e2e-2x224 75 (torch and FFCV, loader and e2e) |
#   e2e-torch-multicrop 45 | host-2x224 45, host-multicrop 45 (each backend's CPU ms per unlabeled
#   image on the GPU machine's cores): 470 in all
# Phase 3 (DALI; on a later loan unless 8 minutes are left): the calls of gpu_parts/CALLS.txt carry
#   DALI's parts into /tmp/gpu_parts back to back (a warm machine keeps /tmp; on a fresh one part 1
#   first, for data.tar), then GPU_PHASE=3, timeout_s 320: install-dali 90 | dali-data 40 |
#   dali-2x224 90, dali-multicrop 90 (DALI's compute, loader, e2e and host rows): 310 in all.
#
# Rehearsal, on any machine without a GPU: GPU_REHEARSAL=1 bash tools/gpu_check.sh runs every stage of
# every phase on the CPU at tiny shapes, on generated data (tools.make_demo_data), the CUDA tests with
# the CPU as the device; tests/test_gpu_rehearsal.py runs its fast core (GPU_STAGES).
# Knobs: GPU_PHASE (1, 2, 3 or all), GPU_STAGES (run only these stages, space-separated), GPU_CARRIED
# (gpu_parts: the parts a call carries), GPU_PARTS (/tmp/gpu_parts: all parts so far), GPU_SITE
# (/tmp/site), GPU_DATA (/tmp/gpu_data), GPU_DATA_TAR (a data.tar elsewhere), PYTHON, GPU_STEPS (30),
# GPU_WINDOWS (3), GPU_WARMUP (10), GPU_WORKERS (14), GPU_LIMIT_SCALE (1; 10 in a rehearsal, for busy CPUs).
# Each "[time]" line gives the stage's wall time and the CPU time of its processes (the figure that
# a busy machine disturbs least).
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSAL=${GPU_REHEARSAL:-0}
PHASE=${GPU_PHASE:-$([ "$REHEARSAL" = 1 ] && echo all || echo 1)}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PARTS=${GPU_PARTS:-/tmp/gpu_parts} SITE=${GPU_SITE:-/tmp/site} DATA=${GPU_DATA:-/tmp/gpu_data}
export CARRIED=${GPU_CARRIED:-gpu_parts}  # the parts this call carried
export PY=${PYTHON:-python3} PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 REHEARSAL
SCALE=${GPU_LIMIT_SCALE:-$([ "$REHEARSAL" = 1 ] && echo 10 || echo 1)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export SRC=$DATA/imagenette2 CONV=$DATA/converted  # read by the functions the stages run in bash -uc
START=$(date +%s.%N)
SUMMARY=()
FAILED=0

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
cpu_used() {  # CPU=the CPU seconds (user + sys) of every stage so far (`times` in this shell, not a subshell)
  times >"$WORK/times"
  CPU=$(awk 'NR == 2 { split($1, u, "m"); split($2, s, "m"); print u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$WORK/times")
}
wanted() {  # wanted "PHASES" STAGE: whether this call runs the stage
  [ -n "${GPU_STAGES:-}" ] && { [[ " $GPU_STAGES " == *" $2 "* ]]; return; }
  [ "$PHASE" = all ] || [[ " $1 " == *" $PHASE "* ]]
}
stage() {  # stage "PHASES" NAME LIMIT_S COMMAND...: run under timeout, log it, keep a [time] line
  local phase=$1 name=$2 limit=$3 t cpu rc line
  shift 3
  wanted "$phase" "$name" || return 0
  t=$(date +%s.%N)
  cpu_used
  cpu=$CPU
  limit=$((limit * SCALE))
  echo "=== $name (limit ${limit} s)" | tee -a "$LOG"
  timeout -k 3 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  cpu_used
  line="[time] $name: $(elapsed "$t") s (CPU $(awk -v a="$cpu" -v b="$CPU" 'BEGIN { printf "%.1f", b - a }') s), rc $rc"
  line+=$([ "$rc" = 124 ] && echo ' (timed out)')
  echo "$line" | tee -a "$LOG"
  SUMMARY+=("$line")
  [ "$rc" = 0 ] || FAILED=1
}
imports() { "$PY" -c "import $1" 2>/dev/null; }

info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import sys, torch, torchvision
print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__,
      'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  echo "cores $(nproc), $(ldd --version | head -1)"
}

install_set() {  # install_set NAME MODULE: the wheels of part set NAME, where MODULE does not import
  if imports "$2"; then echo "$2 imports already"; return 0; fi
  mkdir -p "$PARTS" "$SITE"
  for d in "$CARRIED"/*/; do [ -d "$d" ] && cp -a "$d". "$PARTS"/; done
  [ -f "$PARTS/PARTS" ] || { echo "no parts in $PARTS: make the device calls of gpu_parts/CALLS.txt first"; return 1; }
  local missing files
  missing=$(awk -v s="$1" '$2 == s { print $1, $3 }' "$PARTS/PARTS" | while read -r n f; do
    [ -f "$PARTS/$f" ] || echo "$n"; done | sort -un | tr '\n' ' ')
  [ -z "$missing" ] || { echo "$1: missing part(s) $missing(the machine went cold between calls?): redo those calls"; return 1; }
  files=$(awk -v s="$1" '$2 == s { sub(/\.part[0-9][0-9]$/, "", $3); print $3 }' "$PARTS/PARTS" | sort -u)
  for f in $files; do
    [ -f "$PARTS/$f.part00" ] && cat "$PARTS/$f".part[0-9][0-9] >"$PARTS/$f"
    (cd "$PARTS" && grep " $f\$" SHA256SUMS | sha256sum -c --quiet) || { echo "$1: checksum mismatch of $f"; return 1; }
  done
  (cd "$PARTS" && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    $(echo "$files" | grep '\.whl$')) || return 1
  # nvimgcodec & co ship nvidia/__init__.py; where the image's own nvidia/ is a namespace package,
  # drop ours so that both folders make one namespace (else ours would hide the image's).
  local purelib
  purelib=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  [ -f "$purelib/nvidia/__init__.py" ] || rm -f "$SITE/nvidia/__init__.py"
  echo "$1: installed $(echo "$files" | grep -c '\.whl$') wheels into $SITE ($(du -sh "$SITE" | cut -f1))"
  "$PY" -c "import $2; print('$2 imports from', $2.__file__)"
}

prepare_data() {  # the images to convert: data.tar from the parts (or GPU_DATA_TAR); digits in a rehearsal
  local formats
  formats=$(for m in ffcv:ffcv nvidia.dali:dali; do imports "${m%%:*}" && echo "${m##*:}"; done | paste -sd, -)
  [ "$(cat "$DATA/.converted" 2>/dev/null)" = "formats $formats" ] && { echo "converted already ($formats)"; return 0; }
  rm -rf "$DATA" && mkdir -p "$DATA"
  local tar=${GPU_DATA_TAR:-}
  [ -n "$tar" ] || tar=$(ls "$PARTS/data.tar" "$CARRIED"/*/data.tar 2>/dev/null | head -1)
  if [ -n "$tar" ]; then
    tar xf "$tar" -C "$DATA" || return 1
  elif [ "$REHEARSAL" = 1 ]; then  # digits, cut to 30 train images per class (the stages read a few steps)
    "$PY" -m tools.make_demo_data --out "$SRC" --size 48 || return 1
    rm -rf "$SRC/val"
    for d in "$SRC"/train/*/; do ls "$d" | sort | tail -n +31 | sed "s#^#$d#" | xargs -r rm -f; done
  else
    echo "no data.tar (gpu_parts/1, $PARTS or GPU_DATA_TAR): the e2e stages have nothing to read"; return 1
  fi
  echo "train: $(find "$SRC/train" -type f | wc -l) images"
  if [ -n "$formats" ]; then
    "$PY" -m tools.convert_imagenet --src "$SRC" --out "$CONV" --splits train --formats "$formats" \
      --labeled-fraction 0.1 --shard-size 256 --shard-multiple 8 --jobs "$(nproc)" --no-progress || return 1
  fi
  echo "formats $formats" >"$DATA/.converted"
}
export -f imports install_set prepare_data

# --------------------------------------------------------------------------- shapes and commands

CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z ' 'a-z-')
NAME=${CARD:-cpu}-$(date -u +%Y-%m-%d)
SWAV=configs/imagenet_10pct_swav_suncet.yaml PAWS=configs/imagenet_10pct_paws.yaml
if [ "$REHEARSAL" = 1 ]; then  # every stage on the CPU, tiny: the paper's configs with small overrides
  RUN=(--device cpu --threads 1 --steps 2 --windows 1 --warmup 1 --model resnet18-small --batch-size 4
       --set model.head_hidden_dim=64 --set model.head_out_dim=32 --set loss.swav.prototypes=16
       --set data.support_classes=2 --set data.support_images_per_class=2)
  FED=(--workers 1) MULTICROP=(--views 2x32:0.14-1,2x16:0.05-0.14) TWO_VIEWS=(--views 2x32:0.08-1)
  SWITCHES=config,foreach+nosync,foreach+nosync+bf16,@$WORK/channels_first.yaml
else
  RUN=(--device cuda --steps "${GPU_STEPS:-30}" --windows "${GPU_WINDOWS:-3}" --warmup "${GPU_WARMUP:-10}")
  # Imagenette has 10 classes: a support set of 10 x 4 (as many images as the paper's 20 x 2); the
  # compute stages keep each config's own (synthetic batches).
  FED=(--set data.support_classes=10 --set data.support_images_per_class=4 --workers "${GPU_WORKERS:-14}")
  MULTICROP=() TWO_VIEWS=()  # the configs' own shapes
  SWITCHES=config,foreach+nosync,foreach+nosync+bf16,@$WORK/channels_first.yaml,foreach+nosync+compile
  SWITCHES+=,foreach+nosync+cudagraphs
fi
printf 'model:\n  channels_last: false\n' >"$WORK/channels_first.yaml"
FED+=(--data "$SRC" --data-for "ffcv=$CONV" --data-for "dali=$CONV")
TP=("$PY" -m tools.throughput "${RUN[@]}")  # each stage adds its --json (json STAGE)
FOUND=-  # the loader backends whose module imports here, looked up once a stage needs them
detect() {  # sets FOUND: one Python process tries FFCV and DALI (importing FFCV alone costs seconds)
  [ "$FOUND" = - ] || return 0
  FOUND=$("$PY" -c 'import importlib
for name, module in (("ffcv", "ffcv"), ("dali", "nvidia.dali")):
    try:
        importlib.import_module(module)
        print(name)
    except Exception:
        pass' 2>/dev/null | tr '\n' ' ')
  echo "loader backends that import: torch $FOUND" | tee -a "$LOG"
}
found() {  # found BACKEND...: those that import (torch always), comma-separated; after detect
  local b out=()
  for b in "$@"; do [[ " torch $FOUND " == *" $b "* ]] && out+=("$b"); done
  (IFS=,; echo "${out[*]}")
}
SHAPE_2X224=(--config configs/imagenet_10pct_suncet.yaml "${TWO_VIEWS[@]}")
SHAPE_MULTICROP=(--config configs/imagenet_multicrop.yaml "${MULTICROP[@]}")

# --------------------------------------------------------------------------- the stages

json() { echo "--json=$OUT/$NAME-$1.json"; }
stage 1 info 15 bash -uc "$(declare -f info); info"
stage "1 2" install 25 bash -uc "install_set ffcv ffcv"
# One stage per objective, so that a stage stopped by its limit costs only that objective's figures
# (its variants are timed in turns and reported together): as configured, foreach, foreach+nosync.
VARIANTS=config,foreach,foreach+nosync
stage 1 compute-simclr 30 "${TP[@]}" "$(json compute-simclr)" --mode compute "${SHAPE_2X224[@]}" --step-variants $VARIANTS
stage 1 compute-swav 35 "${TP[@]}" "$(json compute-swav)" --mode compute --config "$SWAV" "${MULTICROP[@]}" \
  --step-variants $VARIANTS
stage 1 compute-paws 35 "${TP[@]}" "$(json compute-paws)" --mode compute --config "$PAWS" "${MULTICROP[@]}" \
  --step-variants $VARIANTS
stage "1 2" data 30 bash -uc prepare_data
wanted 1 e2e && detect
FEEDS=$(found ffcv dali)
stage 1 e2e 70 "${TP[@]}" "$(json e2e-multicrop)" --mode compute,e2e "${SHAPE_MULTICROP[@]}" \
  --backend "${FEEDS:-torch}" "${FED[@]}"
CUDA_TESTS=(tests/test_cuda_check.py)
[ "$REHEARSAL" = 1 ] || CUDA_TESTS+=(tests/test_step.py tests/test_losses.py tests/test_batch_augment.py
  tests/test_pretrain.py tests/test_dali_backend.py)
stage 1 cuda-tests 50 "$PY" -m pytest -q -s -p no:cacheprovider --continue-on-collection-errors -m "not slow" \
  -k "cuda or gpu" "${CUDA_TESTS[@]}"

stage 2 switches 180 "${TP[@]}" "$(json compute-switches)" --mode compute "${SHAPE_2X224[@]}" --step-variants "$SWITCHES"
stage 2 augment 25 "${TP[@]}" "$(json augment)" --mode augment "${SHAPE_MULTICROP[@]}"
wanted 2 e2e-2x224 || wanted 2 host-2x224 || wanted 2 host-multicrop && detect
stage 2 e2e-2x224 75 "${TP[@]}" "$(json e2e-2x224)" --mode compute,loader,e2e "${SHAPE_2X224[@]}" \
  --backend "$(found torch ffcv)" "${FED[@]}"
stage 2 e2e-torch-multicrop 45 "${TP[@]}" "$(json e2e-torch-multicrop)" --mode loader,e2e "${SHAPE_MULTICROP[@]}" \
  --backend torch "${FED[@]}"
stage 2 host-2x224 45 "${TP[@]}" "$(json host-2x224)" --mode host "${SHAPE_2X224[@]}" --backend "$(found torch ffcv dali)" "${FED[@]}"
stage 2 host-multicrop 45 "${TP[@]}" "$(json host-multicrop)" --mode host "${SHAPE_MULTICROP[@]}" --backend "$(found torch ffcv dali)" \
  "${FED[@]}"

stage 3 install-dali 90 bash -uc "install_set dali nvidia.dali"
stage 3 dali-data 40 bash -uc prepare_data
stage 3 dali-2x224 90 "${TP[@]}" "$(json dali-2x224)" --mode compute,loader,e2e,host "${SHAPE_2X224[@]}" \
  --backend dali "${FED[@]}"
stage 3 dali-multicrop 90 "${TP[@]}" "$(json dali-multicrop)" --mode compute,loader,e2e,host "${SHAPE_MULTICROP[@]}" \
  --backend dali "${FED[@]}"

cpu_used
{
  echo "=== summary (phase $PHASE$([ "$REHEARSAL" = 1 ] && echo ', rehearsal on the CPU'); JSON in $OUT)"
  printf '%s\n' "${SUMMARY[@]}"
  echo "[time] total: $(elapsed "$START") s (CPU $CPU s)"
} | tee -a "$LOG"
exit $FAILED
