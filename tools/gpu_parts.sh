#!/usr/bin/env bash
# Prepare what tools/gpu_check.sh needs on a GPU machine that has torch but no DALI, no FFCV and no
# network, as git-ignored parts that each fit one device call (a call carries at most 64 MiB).
#
#   make wheelhouse PY=3.12 OUT=wheelhouse-3.12/        # once, on a connected machine
#   bash tools/gpu_parts.sh --wheelhouse wheelhouse-3.12 [--out gpu_parts] [--part-mib 58]
#        [--data ../shared/data/imagenette2-224.tar] [--train-per-class 200] [--val-per-class 50]
#
# Writes gpu_parts/1 ... gpu_parts/N, each under --part-mib, holding:
#   - the wheels of suncet-pretrain[ffcv,dali-cu13] for CPython 3.12 that the GPU image lacks
#     (IMAGE_PACKAGES below, from the image's package list; the torch stack is never carried);
#     a wheel larger than a part is cut with `split -b` into NAME.partNN, rejoined with `cat`;
#   - data.tar: a class-balanced subset of Imagenette (224 px JPEGs, train + val), which
#     gpu_check.sh converts on the device (DALI shards and .beton);
#   - in every part: SHA256SUMS of the whole set (rejoined wheels, data.tar) and PARTS (which
#     file is in which part), so the device can tell a missing part before starting.
# and gpu_parts/CALLS.txt: the device calls to make, in order (also in gpu_check.sh's header).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELHOUSE=
OUT=gpu_parts
PART_MIB=58
DATA=../shared/data/imagenette2-224.tar
TRAIN_PER_CLASS=200
VAL_PER_CLASS=50
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

usage() { sed -n '2,20p' "$0" >&2; exit 2; }
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

# 1. What the image lacks: resolve the GPU extras offline from the wheelhouse, drop the torch stack
#    and everything the image already has.
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
# (pip's own configuration is ignored here: the wheelhouse alone is the source)
env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
  "$PY" -m pip install -q --dry-run --ignore-installed --no-index --find-links "$WHEELHOUSE" --find-links "$WORK/image" \
  --python-version "$PY_TARGET" --implementation cp "${PLATFORMS[@]}" --platform manylinux2014_x86_64 \
  --only-binary=:all: --target "$WORK/dry" --report "$WORK/report.json" 'suncet-pretrain[ffcv,dali-cu13]'
tr -s ' \n' '\n\n' <<<"$IMAGE_PACKAGES" >"$WORK/image.txt"
echo suncet-pretrain >>"$WORK/image.txt"  # runs from the checkout
"$PY" -m tools.deps select "$WORK/report.json" --python-version "$PY_TARGET" --include-local --paths \
  --exclude-file "$WORK/image.txt" >"$WORK/files.txt"
mkdir -p "$WORK/set"
xargs -a "$WORK/files.txt" -d '\n' cp -t "$WORK/set/"
log "wheels the image lacks: $(ls "$WORK/set" | wc -l), $(du -sh "$WORK/set" | cut -f1)"
ls -1 "$WORK/set" | sed 's/^/  /'

# 2. Data: the first N images (by name) of each class of each split.
"$PY" - "$DATA" "$WORK/set/data.tar" "$TRAIN_PER_CLASS" "$VAL_PER_CLASS" <<'EOF'
import sys, tarfile
from collections import defaultdict
src, dst, n_train, n_val = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
limit = {"train": n_train, "val": n_val}
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
(cd "$WORK/set" && sha256sum -- * >"$WORK/SHA256SUMS")

# 3. Pieces no larger than a part, packed first-fit, largest first.
PART_BYTES=$((PART_MIB * 1024 * 1024))
mkdir -p "$WORK/pieces"
for f in "$WORK"/set/*; do
  if [ "$(stat -c %s "$f")" -gt "$PART_BYTES" ]; then
    split -b "$((PART_BYTES - 1024 * 1024))" -d -a 2 "$f" "$WORK/pieces/$(basename "$f").part"
  else
    cp "$f" "$WORK/pieces/"
  fi
done
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" - "$WORK/pieces" "$OUT" "$PART_BYTES" <<'EOF'
import os, shutil, sys
pieces, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]) - 64 * 1024  # room for PARTS/SHA256SUMS
sizes = sorted(((os.path.getsize(os.path.join(pieces, f)), f) for f in os.listdir(pieces)), reverse=True)
parts = []  # [free bytes, [files]]
for size, name in sizes:
    part = next((p for p in parts if p[0] >= size), None)
    if part is None:
        part = [limit, []]
        parts.append(part)
    part[0] -= size
    part[1].append(name)
with open(os.path.join(pieces, "..", "PARTS"), "w") as f:
    for i, (_, names) in enumerate(parts, 1):
        os.makedirs(os.path.join(out, str(i)))
        for name in sorted(names):
            shutil.move(os.path.join(pieces, name), os.path.join(out, str(i), name))
            f.write(f"{i} {name}\n")
EOF
N=$(ls "$OUT" | wc -l)
for d in "$OUT"/*/; do cp "$WORK/SHA256SUMS" "$WORK/PARTS" "$d"; done

# 4. The device calls.
{
  echo "# Device calls for tools/gpu_check.sh, back to back (a warm machine keeps /tmp for 30 s idle)."
  echo "# Parts land in /tmp/gpu_parts; gpu_check.sh says which are missing if the machine went cold."
  for i in $(seq 1 "$N"); do
    if [ "$i" -lt "$N" ]; then
      echo "call $i: carry [\"$OUT/$i\"]  command: mkdir -p /tmp/gpu_parts && cp -a $OUT/$i/. /tmp/gpu_parts/ && ls /tmp/gpu_parts | wc -l"
    else
      echo "call $i: carry [\"$OUT/$i\"]  command: bash tools/gpu_check.sh   (timeout_s 560; copies $OUT/$i itself)"
    fi
  done
} >"$OUT/CALLS.txt"
log "$N parts under $OUT/ ($(du -sh "$OUT" | cut -f1)):"
du -sh "$OUT"/*/ | sed 's/^/  /'
cat "$OUT/CALLS.txt"
