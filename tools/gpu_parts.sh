#!/usr/bin/env bash
# Prepare what tools/gpu_check.sh needs on a GPU machine that has torch but no DALI, no FFCV and no
# network, as git-ignored parts that each fit one device call (a call carries at most 64 MiB).
#
#   make wheelhouse PY=3.12 OUT=wheelhouse-3.12/        # once, on a connected machine
#   bash tools/gpu_parts.sh --wheelhouse wheelhouse-3.12 [--out gpu_parts] [--part-mib 58]
#        [--data ../shared/data/imagenette2-224.tar] [--train-per-class 200] [--val-per-class 0]
#
# Writes gpu_parts/1 ... gpu_parts/N, each under --part-mib, in two sets:
#   - set ffcv, part 1 alone, carried by gpu_check.sh's first call: the wheels of
#     suncet-pretrain[ffcv] for CPython 3.12 that the GPU image lacks (FFCV and a few small pure
#     wheels) and data.tar, a class-balanced subset of Imagenette (224 px JPEGs; train only by
#     default, which is what gpu_check.sh converts and reads), about 35 MiB;
#   - set dali, parts 2..N: what suncet-pretrain[ffcv,dali-cu13] adds (DALI for CUDA 13 and its
#     nvidia-* libraries, about 260 MB); a wheel larger than a part is cut with `split -b` into
#     NAME.partNN, rejoined with `cat`.
#   The image's own packages (IMAGE_PACKAGES below, from the image's package list) and the torch
#   stack are never carried. Every part holds SHA256SUMS of both sets (rejoined wheels, data.tar)
#   and PARTS ("<part> <set> <file>" lines), so that the device can name a missing part.
# and gpu_parts/CALLS.txt: the device calls to make, in order (also in gpu_check.sh's header).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELHOUSE=
OUT=gpu_parts
PART_MIB=58
DATA=../shared/data/imagenette2-224.tar
TRAIN_PER_CLASS=200
VAL_PER_CLASS=0
PY_TARGET=3.12
# The GPU image's Python packages (device KINDS.md, read 2026-11-17), by canonical name.
IMAGE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11
h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

usage() { sed -n '2,21p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) WHEELHOUSE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --part-mib) PART_MIB=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --train-per-class) TRAIN_PER_CLASS=$2; shift 2 ;;
    --val-per-class) VAL_PER_CLASS=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
[ -n "$WHEELHOUSE" ] && [ -d "$WHEELHOUSE" ] ||
  { echo "--wheelhouse DIR (made by make wheelhouse PY=3.12) is required" >&2; exit 2; }
[ -f "$DATA" ] || { echo "no Imagenette tar at $DATA (--data)" >&2; exit 2; }
PY=${PYTHON:-python3}
OUT=${OUT%/}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
log() { echo "[gpu_parts] $*"; }

# 1. What the image lacks, per set: resolve the GPU extras offline from the wheelhouse and drop the
#    torch stack and everything the image already has; set dali is what the dali-cu13 extra adds.
PLATFORMS=()
for minor in $(seq 39 -1 17); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
# Wheelhouses hold no torch: empty stand-in wheels play the image's torch 2.11 / torchvision 0.26.
mkdir -p "$WORK/image"
"$PY" - "$WORK/image" <<'EOF'
import sys, zipfile
for name, version in [("torch", "2.11.0"), ("torchvision", "0.26.0")]:
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(f"{sys.argv[1]}/{name}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: gpu_parts\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
EOF
tr -s ' \n' '\n\n' <<<"$IMAGE_PACKAGES" >"$WORK/image.txt"
echo suncet-pretrain >>"$WORK/image.txt"  # runs from the checkout
resolve() {  # resolve EXTRAS LIST: the wheel files of suncet-pretrain[EXTRAS] that the image lacks, sorted
  # (pip's own configuration is ignored here: the wheelhouse alone is the source)
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    "$PY" -m pip install -q --dry-run --ignore-installed --no-index --find-links "$WHEELHOUSE" \
    --find-links "$WORK/image" --python-version "$PY_TARGET" --implementation cp "${PLATFORMS[@]}" \
    --platform manylinux2014_x86_64 --only-binary=:all: --target "$WORK/dry" --report "$WORK/report.json" \
    "suncet-pretrain[$1]"
  "$PY" -m tools.deps select "$WORK/report.json" --python-version "$PY_TARGET" --include-local --paths \
    --exclude-file "$WORK/image.txt" | sort >"$2"
}
resolve ffcv "$WORK/ffcv.txt"
resolve ffcv,dali-cu13 "$WORK/all.txt"
comm -13 "$WORK/ffcv.txt" "$WORK/all.txt" >"$WORK/dali.txt"
mkdir -p "$WORK/set/ffcv" "$WORK/set/dali"
for set in ffcv dali; do
  if [ -s "$WORK/$set.txt" ]; then xargs -a "$WORK/$set.txt" -d '\n' cp -t "$WORK/set/$set/"; fi
  log "set $set, wheels the image lacks: $(ls "$WORK/set/$set" | wc -l), $(du -sh "$WORK/set/$set" | cut -f1)"
  ls -1 "$WORK/set/$set" | sed 's/^/  /'
done

# 2. Data (set ffcv): the first N images (by name) of each class of each split.
"$PY" - "$DATA" "$WORK/set/ffcv/data.tar" "$TRAIN_PER_CLASS" "$VAL_PER_CLASS" <<'EOF'
import sys, tarfile
from collections import defaultdict
src, dst, n_train, n_val = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
limit = {split: n for split, n in (("train", n_train), ("val", n_val)) if n > 0}
with tarfile.open(src) as tf:
    members = [m for m in tf.getmembers() if m.isfile() and m.name.lower().endswith((".jpeg", ".jpg"))]
    by_class = defaultdict(list)
    for m in members:
        parts = m.name.split("/")  # imagenette2/<split>/<wnid>/<file>
        if len(parts) == 4 and parts[1] in limit:
            by_class[parts[1], parts[2]].append(m)
    chosen = [m for (split, _), ms in sorted(by_class.items()) for m in sorted(ms, key=lambda m: m.name)[:limit[split]]]
    with tarfile.open(dst, "w") as out:
        for m in chosen:
            out.addfile(m, tf.extractfile(m))
counts = defaultdict(int)
for m in chosen:
    counts[m.name.split("/")[1]] += 1
print(f"[gpu_parts] data.tar: {dict(counts)} images, {len(by_class)} split/class folders")
EOF
(cd "$WORK/set" && sha256sum -- */* | sed 's#  [a-z]*/#  #' >"$WORK/SHA256SUMS")

# 3. Part 1: set ffcv whole (the first call carries it); parts 2..N: set dali in pieces no larger
#    than a part, packed first-fit, largest first.
PART_BYTES=$((PART_MIB * 1024 * 1024))
FIRST=$(du -sb "$WORK/set/ffcv" | cut -f1)
if [ "$FIRST" -gt $((PART_BYTES - 64 * 1024)) ]; then
  echo "set ffcv is $((FIRST >> 20)) MiB, more than a part (--part-mib $PART_MIB): use fewer --train-per-class" >&2
  exit 1
fi
rm -rf "$OUT" && mkdir -p "$OUT/1"
cp "$WORK"/set/ffcv/* "$OUT/1/"
ls "$OUT/1" | sed 's/^/1 ffcv /' >"$WORK/PARTS"
mkdir -p "$WORK/pieces"
for f in "$WORK"/set/dali/*; do
  [ -e "$f" ] || continue
  if [ "$(stat -c %s "$f")" -gt "$PART_BYTES" ]; then
    split -b "$((PART_BYTES - 1024 * 1024))" -d -a 2 "$f" "$WORK/pieces/$(basename "$f").part"
  else
    cp "$f" "$WORK/pieces/"
  fi
done
"$PY" - "$WORK/pieces" "$OUT" "$PART_BYTES" "$WORK/PARTS" <<'EOF'
import os, shutil, sys
pieces, out, listing = sys.argv[1], sys.argv[2], sys.argv[4]
limit = int(sys.argv[3]) - 64 * 1024  # room for PARTS and SHA256SUMS
sizes = sorted(((os.path.getsize(os.path.join(pieces, f)), f) for f in os.listdir(pieces)), reverse=True)
parts = []  # [free bytes, [files]]
for size, name in sizes:
    part = next((p for p in parts if p[0] >= size), None)
    if part is None:
        part = [limit, []]
        parts.append(part)
    part[0] -= size
    part[1].append(name)
with open(listing, "a") as f:
    for i, (_, names) in enumerate(parts, 2):
        os.makedirs(os.path.join(out, str(i)))
        for name in sorted(names):
            shutil.move(os.path.join(pieces, name), os.path.join(out, str(i), name))
            f.write(f"{i} dali {name}\n")
EOF
N=$(ls -d "$OUT"/*/ | wc -l)
for d in "$OUT"/*/; do cp "$WORK/SHA256SUMS" "$WORK/PARTS" "$d"; done

# 4. The device calls (their limits are gpu_check.sh's stage limits, as its header adds them up).
{
  echo "# Device calls for tools/gpu_check.sh (BENCHMARKS.md, \"GPU check\"); 15 minutes of device time in all."
  echo "call 1 (compute and e2e figures, about 5 min with the machine's start): carry [\"$OUT/1\"], timeout_s 300"
  echo "    command: bash tools/gpu_check.sh"
  echo "call 2 (optional, about 8 min: only with 9 left): carry [\"$OUT/1\"], timeout_s 480"
  echo "    command: GPU_PHASE=2 bash tools/gpu_check.sh"
  if [ "$N" -gt 1 ]; then
    echo "# DALI (phase 3: a transfer per part, then about 4 min; only with 8 min left, else on a later loan):"
    echo "# these calls back to back, each within 30 s of the last (a warm machine keeps /tmp 30 s idle);"
    echo "# on a fresh machine first: carry [\"$OUT/1\"]  command: mkdir -p /tmp/gpu_parts && cp -a $OUT/1/. /tmp/gpu_parts/"
  fi
  for i in $(seq 2 "$N"); do
    if [ "$i" -lt "$N" ]; then
      echo "call: carry [\"$OUT/$i\"]  command: mkdir -p /tmp/gpu_parts && cp -a $OUT/$i/. /tmp/gpu_parts/"
    else
      echo "call: carry [\"$OUT/$i\"], timeout_s 320  command: GPU_PHASE=3 bash tools/gpu_check.sh   (copies $OUT/$i)"
    fi
  done
} >"$OUT/CALLS.txt"
log "$N parts under $OUT/ ($(du -sh "$OUT" | cut -f1)):"
du -sh "$OUT"/*/ | sed 's/^/  /'
cat "$OUT/CALLS.txt"
