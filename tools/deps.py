"""Which installed (or resolved) packages belong to the torch stack, and which to the project.

A GPU cluster brings its own torch: torch, torchvision, and what only they pull in (CUDA wheels,
triton, sympy, ...). Everything else the project needs is pinned in ``requirements/constraints.txt``
and collected into offline wheelhouses; the torch stack is pinned separately in
``requirements/torch.txt``, which ``make setup`` installs only where no torch is installed, so that
the constraints never ask pip to replace a cluster's torch or its CUDA libraries.

  python -m tools.deps lock [--out requirements] [--report R.json ...]
      write torch.txt and constraints.txt from the running environment (the tested set); packages a
      pip ``--report`` resolved but this environment lacks (e.g. the dali-cu13 extra's) are added to
      the constraints, marked as resolved-only
  python -m tools.deps select R.json [--python-version 3.12] [--include-local] [--exclude-file F] [--paths]
      print ``name==version`` for every package of a ``pip install --dry-run --report`` resolution
      outside the torch stack, for ``pip download --no-deps -r``; packages that pip found as local
      files (a ``--find-links`` folder) are left out unless --include-local, they are already there;
      --sdists lists only those pip would build from source (to build their wheels once)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from packaging.markers import default_environment
from packaging.requirements import Requirement

TORCH_ROOTS = ("torch", "torchvision")
PROJECT = "suncet-pretrain"
# Not pinned anywhere, as in `pip freeze`: installers and build tools the environment already has.
UNPINNED = ("pip", "setuptools", "wheel", "distribute")

def canonical(name: str) -> str:
    """PEP 503 normalised name: ``PyYAML`` -> ``pyyaml``, ``typing_extensions`` -> ``typing-extensions``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Package:
    name: str  # canonical
    version: str
    requires: tuple[str, ...]  # Requires-Dist entries, as written
    local: bool = False  # found as a local file (resolution reports only)
    extras: tuple[str, ...] = ()  # Provides-Extra


def _edges(pkg: Package, extras: frozenset[str], env: dict[str, str]) -> list[tuple[str, frozenset[str]]]:
    """(canonical name, extras asked for) of each requirement of ``pkg`` that applies in ``env``
    with ``extras`` of ``pkg`` requested."""
    edges = []
    for text in pkg.requires:
        req = Requirement(text)
        marker = req.marker
        if marker is None or any(marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            edges.append((canonical(req.name), frozenset(canonical(e) for e in req.extras)))
    return edges


def reach(packages: dict[str, Package], start: dict[str, frozenset[str]], env: dict[str, str],
          blocked: frozenset[str] = frozenset()) -> set[str]:
    """Names reachable from ``start`` (name -> extras asked for), not entering ``blocked``."""
    extras_seen: dict[str, frozenset[str]] = {}
    todo = [(n, x) for n, x in start.items() if n in packages]
    while todo:
        name, extras = todo.pop()
        if name in extras_seen and extras <= extras_seen[name]:
            continue
        extras_seen[name] = extras_seen.get(name, frozenset()) | extras
        todo.extend((r, x) for r, x in _edges(packages[name], extras_seen[name], env)
                    if r in packages and r not in blocked)
    return set(extras_seen)


def torch_stack(packages: dict[str, Package], env: dict[str, str] | None = None,
                roots: tuple[str, ...] = TORCH_ROOTS) -> set[str]:
    """Names reachable from ``roots`` that no other package needs except through the roots.

    Markers are evaluated in ``env`` (default: this interpreter's), extras followed where a
    requirement asks for them (``cuda-toolkit[cublas]``). Every package the roots do not reach
    is a starting point of the other side, with no extras of its own."""
    env = dict(env) if env is not None else default_environment()
    root_set = frozenset(canonical(r) for r in roots if canonical(r) in packages)
    from_torch = reach(packages, dict.fromkeys(root_set, frozenset()), env)
    others = dict.fromkeys(set(packages) - from_torch, frozenset())
    return from_torch - reach(packages, others, env, blocked=root_set)


def installed_packages() -> dict[str, Package]:
    found: dict[str, Package] = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        extras = tuple(canonical(e) for e in dist.metadata.get_all("Provides-Extra") or [])
        found.setdefault(name, Package(name, dist.version, tuple(dist.requires or []), extras=extras))
    return found


def report_packages(report: dict) -> dict[str, Package]:
    """Packages of a ``pip install --dry-run --report`` (format version 1)."""
    found: dict[str, Package] = {}
    for item in report["install"]:
        meta = item["metadata"]
        url = item.get("download_info", {}).get("url", "")
        name = canonical(meta["name"])
        requires = tuple(meta.get("requires_dist", []))
        found[name] = Package(name, meta["version"], requires, local=url.startswith("file:"))
    return found


def pins(packages: dict[str, Package], names: set[str]) -> list[str]:
    return [f"{packages[n].name}=={packages[n].version}" for n in sorted(names)]


def split(packages: dict[str, Package]) -> tuple[list[str], list[str]]:
    """(torch stack pins, project pins) of an environment: what the installed project needs with
    all its extras (everything installed, if the project is not), the project and installers left out."""
    if PROJECT in packages:
        needed = reach(packages, {PROJECT: frozenset(packages[PROJECT].extras)}, default_environment())
    else:
        needed = set(packages)
    keep = {n for n in needed if n not in UNPINNED and n != PROJECT}
    stack = torch_stack(packages) & keep
    return pins(packages, stack), pins(packages, keep - stack)


def write_lock(out: Path, packages: dict[str, Package], resolved: list[dict[str, Package]]) -> None:
    stack, project = split(packages)
    extra: set[str] = set()
    extra_pkgs: dict[str, Package] = {}
    for res in resolved:
        outside = torch_stack(res)
        for name, pkg in res.items():
            if name not in packages and name not in outside and name not in UNPINNED and name != PROJECT:
                extra.add(name)
                extra_pkgs[name] = pkg
    python = ".".join(map(str, sys.version_info[:3]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "torch.txt").write_text(
        "# The torch stack of the tested environment (Python " + python + "), written by\n"
        "# `python -m tools.deps lock`. `make setup` installs it only where no torch is installed;\n"
        "# an installed torch within setup.cfg's range is kept.\n" + "\n".join(stack) + "\n")
    body = "\n".join(project)
    if extra:
        body += ("\n# resolved by pip with these constraints for extras that the environment above does\n"
                 "# not have installed (e.g. dali-cu13; the wheelhouse's FFCV needs opencv-python-headless):\n"
                 + "\n".join(pins(extra_pkgs, extra)))
    (out / "constraints.txt").write_text(
        "# Exact versions the test suite ran with (Python " + python + "), written by\n"
        "# `python -m tools.deps lock`. Used as pip constraints by `make setup`, CI and\n"
        "# tools/build_wheelhouse.sh. The torch stack is in torch.txt, never here.\n" + body + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.deps", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    lock = sub.add_parser("lock", help="write torch.txt and constraints.txt from this environment")
    lock.add_argument("--out", default="requirements", help="folder for the two files (default: requirements)")
    lock.add_argument("--report", action="append", default=[],
                      help="a pip --report JSON whose extra packages are added to the constraints (repeatable)")
    select = sub.add_parser("select", help="print the non-torch packages of a pip --report as name==version")
    select.add_argument("report", help="JSON written by `pip install --dry-run --report`")
    select.add_argument("--python-version", help="evaluate markers for this Python (e.g. 3.12; pip's report "
                        "holds the running interpreter's environment even with --python-version)")
    select.add_argument("--include-local", action="store_true",
                        help="also list packages pip found as local files (a --find-links folder)")
    select.add_argument("--exclude-file", help="leave out the package names listed in this file (whitespace-separated)")
    select.add_argument("--sdists", action="store_true",
                        help="only the packages that pip would build from a source distribution")
    select.add_argument("--paths", action="store_true",
                        help="print each package's file path (local files) or URL instead of name==version")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "lock":
        resolved = [report_packages(json.loads(Path(r).read_text())) for r in args.report]
        write_lock(Path(args.out), installed_packages(), resolved)
        return 0
    report = json.loads(Path(args.report).read_text())
    env = dict(report.get("environment") or default_environment())
    if args.python_version:
        env["python_version"] = ".".join(args.python_version.split(".")[:2])
        env["python_full_version"] = args.python_version if args.python_version.count(".") == 2 \
            else args.python_version + ".0"
    packages = report_packages(report)
    excluded = torch_stack(packages, env)
    if args.exclude_file:
        excluded |= {canonical(n) for n in Path(args.exclude_file).read_text().split()}
    urls = {canonical(i["metadata"]["name"]): i.get("download_info", {}).get("url", "") for i in report["install"]}
    for name in sorted(set(packages) - excluded):
        if packages[name].local and not args.include_local:
            continue
        url = urls[name]
        if args.sdists and urlparse(url).path.endswith(".whl"):
            continue
        if args.paths:
            print(unquote(urlparse(url).path) if url.startswith("file:") else url)
        else:
            print(f"{packages[name].name}=={packages[name].version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
