"""tools/gpu_parts.sh and the install stage of tools/gpu_check.sh, on a wheelhouse of stand-in wheels.

The GPU image lacks DALI and FFCV and reaches no network; a call carries at most 64 MiB. The parts
must put FFCV and the data in part 1 (the first call), DALI in parts 2..N (cut where a wheel is
larger than a part), leave out what the image has, and install on the device from whatever parts
arrived, naming the missing ones. Stand-ins: a few kB each, the DALI one larger than a part."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# name, version, requirements, size of incompressible payload (bytes)
WHEELS = [
    ("suncet-pretrain", "0.1.0", ["torch>=2.11", "numpy", 'ffcv; extra == "ffcv"',
                                  'nvidia-dali-cuda130; extra == "dali-cu13"'], 0),
    ("numpy", "2.0.0", [], 0),  # the image has it: never carried
    ("numba", "0.60.0", [], 0),
    ("ffcv", "1.0.2", ["fastargs", "numba", "numpy"], 0),
    ("fastargs", "1.2.0", [], 0),
    ("nvidia-dali-cuda130", "2.4.0", ["astunparse", "numpy"], 5 * 2**19),  # larger than a part of 2 MiB
    ("astunparse", "1.6.3", [], 600 * 1024),
]
EXTRAS = "Provides-Extra: ffcv\nProvides-Extra: dali-cu13\n"

# Makes gpu_check.sh's `python -c "import ffcv"` fail unless ffcv is installed in GPU_SITE (this
# environment has the real ffcv and DALI; the device image has neither).
HIDE = '''import importlib.machinery, os, sys
class HideOutsideSite:
    def find_spec(self, name, path=None, target=None):
        if name == "ffcv" or name.startswith("ffcv.") or name == "nvidia.dali" or name.startswith("nvidia.dali."):
            site = os.environ["GPU_SITE"]
            where = [os.path.join(site, *name.split(".")[:-1])]
            spec = importlib.machinery.PathFinder.find_spec(name, where)
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden outside {site})")
            return spec
        return None
sys.meta_path.insert(0, HideOutsideSite())
'''


def stand_in_wheel(folder: Path, name: str, version: str, requires: list[str], payload: int) -> Path:
    dist = name.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    module = {"nvidia-dali-cuda130": "nvidia/dali", "suncet-pretrain": "suncet_stand_in"}.get(name, dist)
    with zipfile.ZipFile(path, "w") as zf:
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        meta += (EXTRAS if name == "suncet-pretrain" else "") + "".join(f"Requires-Dist: {r}\n" for r in requires)
        zf.writestr(f"{info}/METADATA", meta)
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{module}/__init__.py", f"STAND_IN = {name!r}\n")
        if payload:
            zf.writestr(f"{module}/payload.bin", os.urandom(payload), compress_type=zipfile.ZIP_STORED)
        zf.writestr(f"{info}/RECORD", "")
    return path


def imagenette_tar(path: Path) -> None:
    """imagenette2/{train,val}/<wnid>/*.JPEG, 3 images per class and split (bytes need not be JPEGs)."""
    with tarfile.open(path, "w") as tf:
        for split in ("train", "val"):
            for wnid in ("n01440764", "n02102040"):
                for i in range(3):
                    data = f"{split} {wnid} {i}".encode()
                    info = tarfile.TarInfo(f"imagenette2/{split}/{wnid}/{wnid}_{i}.JPEG")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gpu_parts")
    house = tmp / "wheelhouse"
    house.mkdir()
    for wheel in WHEELS:
        stand_in_wheel(house, *wheel)
    imagenette_tar(tmp / "imagenette.tar")
    out = tmp / "parts"
    proc = subprocess.run(["bash", "tools/gpu_parts.sh", "--wheelhouse", str(house), "--out", str(out),
                           "--part-mib", "2", "--data", str(tmp / "imagenette.tar"), "--train-per-class", "2"],
                          cwd=REPO, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_part_one_holds_ffcv_and_the_data_and_dali_follows_in_pieces(parts):
    first = sorted(p.name for p in (parts / "1").iterdir())
    assert first == ["PARTS", "SHA256SUMS", "data.tar", "fastargs-1.2.0-py3-none-any.whl",
                     "ffcv-1.0.2-py3-none-any.whl"]  # numpy, numba, torch: the image has them
    with tarfile.open(parts / "1" / "data.tar") as tf:
        names = sorted(m.name for m in tf.getmembers())
    assert names == [f"imagenette2/train/{w}/{w}_{i}.JPEG" for w in ("n01440764", "n02102040") for i in range(2)]
    later = sorted(p.name for d in parts.iterdir() if d.is_dir() and d.name != "1" for p in d.iterdir()
                   if p.name not in ("PARTS", "SHA256SUMS"))
    dali = "nvidia_dali_cuda130-2.4.0-py3-none-any.whl"
    assert later == ["astunparse-1.6.3-py3-none-any.whl"] + [f"{dali}.part{i:02d}" for i in range(3)]  # 1 MiB pieces
    for d in parts.iterdir():
        if d.is_dir():
            assert sum(f.stat().st_size for f in d.iterdir()) < 2 * 2**20, d
    listing = (parts / "1" / "PARTS").read_text().split("\n")
    assert "1 ffcv data.tar" in listing and any(line.endswith(" dali astunparse-1.6.3-py3-none-any.whl")
                                                for line in listing)
    calls = (parts / "CALLS.txt").read_text()
    assert "command: bash tools/gpu_check.sh" in calls and "GPU_PHASE=2 bash tools/gpu_check.sh" in calls
    assert "GPU_PHASE=3 bash tools/gpu_check.sh" in calls


def _install(parts: Path, tmp: Path, stages: str, on_device: list[str]) -> subprocess.CompletedProcess:
    """gpu_check.sh's install stages, the call carrying ``parts`` / 1, with ``on_device`` parts
    already in /tmp/gpu_parts from earlier calls."""
    device, site, hide = tmp / "device_parts", tmp / "site", tmp / "hide"
    device.mkdir(parents=True)
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE)
    for name in on_device:
        for f in (parts / name).iterdir():
            (device / f.name).write_bytes(f.read_bytes())
    carried = tmp / "carried"
    (carried / "1").mkdir(parents=True)
    for f in (parts / "1").iterdir():
        (carried / "1" / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "GPU_STAGES": stages, "GPU_CARRIED": str(carried), "GPU_PARTS": str(device),
           "GPU_SITE": str(site), "GPU_DATA": str(tmp / "data"), "OUT": str(tmp / "out"), "PYTHON": sys.executable,
           "PYTHONPATH": str(hide)}
    return subprocess.run(["bash", "tools/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_device_installs_from_the_parts_and_names_a_missing_one(parts, tmp_path):
    later = sorted(d.name for d in parts.iterdir() if d.is_dir() and d.name != "1")
    complete = _install(parts, tmp_path / "all", "install install-dali", later)
    assert complete.returncode == 0, complete.stdout[-3000:]
    assert "ffcv: installed 2 wheels" in complete.stdout and "ffcv imports from" in complete.stdout
    assert "dali: installed 2 wheels" in complete.stdout and "nvidia.dali imports from" in complete.stdout
    site = tmp_path / "all" / "site"
    assert (site / "nvidia" / "dali" / "payload.bin").stat().st_size == 5 * 2**19  # rejoined from its pieces
    lost = _install(parts, tmp_path / "cold", "install install-dali", later[1:])  # the machine went cold
    assert lost.returncode == 1
    assert "ffcv: installed 2 wheels" in lost.stdout
    assert f"dali: missing part(s) {later[0]} (the machine went cold between calls?)" in lost.stdout
