#!/usr/bin/env bash
# System libraries that FFCV (built from source) needs. Installs them with
# apt-get only when the headers are missing; explains what to do otherwise.
set -euo pipefail

have_headers() {
  command -v pkg-config >/dev/null 2>&1 &&
    pkg-config --exists opencv4 2>/dev/null &&
    { pkg-config --exists libturbojpeg 2>/dev/null || [ -f /usr/include/turbojpeg.h ]; } &&
    command -v gcc >/dev/null 2>&1
}

if have_headers; then
  exit 0
fi

PKGS="pkg-config build-essential python3-dev libturbojpeg0-dev libopencv-dev"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: FFCV needs OpenCV and libjpeg-turbo headers, and this is not a Debian/Ubuntu system." >&2
  echo "Install the equivalents of: $PKGS (e.g. conda install -c conda-forge opencv libjpeg-turbo pkg-config)," >&2
  echo "then rerun make setup." >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "error: FFCV needs system packages that are missing, and installing them needs root:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y $PKGS" >&2
    echo "Run that once, then rerun make setup." >&2
    exit 1
  fi
fi
echo "installing FFCV build dependencies: $PKGS"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $PKGS
