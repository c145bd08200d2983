"""Packaging: version ranges that keep a cluster's torch, the lock files, extras, console entry
points, configs inside a built wheel, and the torch-stack split behind the lock and the wheelhouse."""
from __future__ import annotations

import configparser
import importlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tools import deps

ROOT = Path(__file__).resolve().parents[1]
# torch/torchvision of the GPU image (CUDA 13 build) and of the test machine: both must install.
SUPPORTED = {"torch": ["2.11.0+cu130", "2.14.1"], "torchvision": ["0.26.0+cu130", "0.29.1"]}
ENTRY_POINTS = {
    "suncet-pretrain": "train.pretrain:main",
    "suncet-convert": "tools.convert_imagenet:main",
    "suncet-throughput": "tools.throughput:main",
    "suncet-evaluate": "train.evaluate:main",
    "suncet-verify": "tools.verify_converted:main",
    "suncet-export": "tools.export:main",
}


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def requirements(value: str) -> list[Requirement]:
    return [Requirement(line) for line in value.strip().splitlines() if line.strip()]


def install_requires() -> dict[str, Requirement]:
    return {deps.canonical(r.name): r for r in requirements(setup_cfg()["options"]["install_requires"])}


def extras() -> dict[str, list[Requirement]]:
    section = setup_cfg()["options.extras_require"]
    return {name: requirements(section[name]) for name in section}


def lock(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[deps.canonical(req.name)] = Version(spec.version)
    return pins


def test_torch_is_a_range_admitting_the_gpu_image_and_this_machine():
    reqs = install_requires()
    for name, versions in SUPPORTED.items():
        spec = reqs[name].specifier
        assert not any(s.operator in ("==", "===", "~=") for s in spec), f"{name} is pinned: {spec}"
        for version in versions:
            assert spec.contains(version), f"{name}{spec} excludes {version}"


def test_core_requirements_are_ranges_not_pins():
    pinned = [str(r) for r in install_requires().values()
              if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned


def test_lock_never_pins_the_torch_stack():
    constraints, torch = lock("constraints.txt"), lock("torch.txt")
    assert not set(constraints) & set(torch)
    assert {"torch", "torchvision"} <= set(torch)
    reqs = install_requires()
    for name in ("torch", "torchvision"):
        assert reqs[name].specifier.contains(torch[name]), f"torch.txt's {name} {torch[name]} is outside setup.cfg"


def test_every_locked_version_satisfies_setup_cfg():
    pins = {**lock("constraints.txt"), **lock("torch.txt")}
    wanted = list(install_requires().values()) + [r for reqs in extras().values() for r in reqs]
    outside = [f"{r} (locked {pins[deps.canonical(r.name)]})" for r in wanted
               if deps.canonical(r.name) in pins and not r.specifier.contains(pins[deps.canonical(r.name)])]
    assert not outside


def test_dali_extras_per_cuda_major():
    ex = extras()
    assert [r.name for r in ex["dali-cu12"]] == ["nvidia-dali-cuda120"]
    assert [r.name for r in ex["dali-cu13"]] == ["nvidia-dali-cuda130"]
    assert [str(r) for r in ex["dali"]] == [str(r) for r in ex["dali-cu12"]]
    for name in ("dali-cu12", "dali-cu13"):
        assert ex[name][0].specifier.contains("2.4.0")
    assert {"ffcv", "dev"} <= set(ex)


def test_console_entry_points_resolve_to_main_functions():
    section = setup_cfg()["options.entry_points"]["console_scripts"]
    declared = dict(line.replace(" ", "").split("=") for line in section.strip().splitlines())
    assert declared == ENTRY_POINTS
    for target in declared.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.timeout(300)
def test_built_wheel_ships_configs_and_entry_points(tmp_path):
    """A non-editable wheel (what a wheelhouse holds) carries configs/*.yaml as package data."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("pipelines", "model", "train", "tools", "configs"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(src)], check=True, cwd=tmp_path)
    (wheel,) = out.glob("suncet_pretrain-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    configs = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert configs and all(f"configs/{c}" in names for c in configs)
    assert "configs/__init__.py" in names
    assert not [n for n in names if n.startswith("tests/")]
    for script, target in ENTRY_POINTS.items():
        assert f"{script} = {target}" in scripts


def pkg(name: str, *requires: str, version: str = "1.0", local: bool = False) -> deps.Package:
    return deps.Package(deps.canonical(name), version, tuple(requires), local)


GRAPH = {p.name: p for p in [
    pkg("suncet-pretrain", "torch>=2.11", "torchvision", "numpy", "pillow", "fonttools",
        'pytest; extra == "dev"'),
    pkg("torch", "sympy>=1.13", "typing-extensions", "cuda-toolkit[cublas]==13.0.3",
        'optree; extra == "optree"', 'triton; python_version < "3.12"'),
    pkg("torchvision", "torch", "numpy", "pillow"),
    pkg("cuda-toolkit", 'nvidia-cublas; extra == "cublas"', 'nvidia-cufft; extra == "cufft"'),
    pkg("nvidia-cublas"), pkg("nvidia-cufft"), pkg("sympy", "mpmath"), pkg("mpmath"),
    pkg("triton"), pkg("numpy"), pkg("pillow"), pkg("pytest"),
    pkg("fonttools", 'sympy; extra == "symfont"'),
    pkg("optree", "typing-extensions"), pkg("typing-extensions"),
    pkg("pytorch-pfn-extras", "torch", "numpy"),
]}


def test_torch_stack_follows_extras_and_markers():
    env = {**deps.default_environment(), "python_version": "3.12", "python_full_version": "3.12.3"}
    stack = deps.torch_stack(GRAPH, env)
    # cuda-toolkit's cublas extra is asked for, cufft is not; fonttools' optional sympy does not
    # count; typing-extensions is also optree's; triton's marker is false on 3.12.
    assert stack == {"torch", "torchvision", "cuda-toolkit", "nvidia-cublas", "sympy", "mpmath"}
    env_311 = {**env, "python_version": "3.11", "python_full_version": "3.11.7"}
    assert deps.torch_stack(GRAPH, env_311) == stack | {"triton"}


def test_select_lists_the_wheels_to_download(tmp_path, capsys):
    items = []
    for p in GRAPH.values():
        url = "file:///wh/suncet_pretrain-0.1.0-py3-none-any.whl" if p.name == "suncet-pretrain" \
            else f"https://files.example/{p.name}.whl"
        items.append({"metadata": {"name": p.name, "version": p.version, "requires_dist": list(p.requires)},
                      "download_info": {"url": url}})
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"version": "1", "install": items, "environment": {}}))
    assert deps.main(["select", str(report), "--python-version", "3.12"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == sorted(f"{n}==1.0" for n in
                            ["numpy", "pillow", "pytest", "fonttools", "optree", "typing-extensions",
                             "pytorch-pfn-extras", "triton", "nvidia-cufft"])


def test_lock_pins_what_the_project_needs_not_everything_installed():
    installed = dict(GRAPH)
    installed["suncet-pretrain"] = deps.Package("suncet-pretrain", "0.1.0", GRAPH["suncet-pretrain"].requires,
                                                extras=("dev",))
    installed["safetensors"] = pkg("safetensors")  # installed by hand, needed by nothing here
    installed["pip"] = pkg("pip")
    torch_pins, project_pins = deps.split(installed)
    names = {p.split("==")[0] for p in project_pins}
    assert "pytest" in names and "numpy" in names  # an extra's requirement, a core one
    assert not names & {"safetensors", "pip", "suncet-pretrain", "torch", "torchvision"}
    assert {p.split("==")[0] for p in torch_pins} >= {"torch", "torchvision"}
