"""Check a converted dataset against its manifest: every file the converter
wrote exists, with the recorded size and sha256.

Usage::

    python -m tools.verify_converted OUT [--splits train,val]

Training checks sizes at start-up (cheap); this reads every byte, so it also
finds bit rot or an in-place edit inside a ``.beton`` or shard, which FFCV
would decode to noise without an error. Exit status 0 when everything
matches, 1 otherwise (each bad file is printed), 2 when OUT is no conversion.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.errors import DataError
from pipelines.format import layout
from pipelines.format.manifest import record_problem
from pipelines.format.root_advice import conversion_above


def verify(out: Path, splits: list[str] | None = None) -> list[str]:
    """Problems found in ``out`` (empty: every listed file matches)."""
    manifest = layout.read_manifest(out)
    entries = manifest.get("splits", {})
    problems = [f"split {s!r}: not in {out / layout.MANIFEST}" for s in (splits or []) if s not in entries]
    if "labels_file" in manifest:
        problem = record_problem(out, manifest["labels_file"])
        if problem:
            problems.append(problem)
    for split, entry in entries.items():
        if splits and split not in splits:
            continue
        if not entry.get("complete"):
            problems.append(f"split {split!r}: conversion incomplete")
        for record in entry.get("files", []):
            problem = record_problem(out, record)
            if problem:
                problems.append(problem)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.verify_converted", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output directory of tools.convert_imagenet")
    p.add_argument("--splits", help="comma-separated splits to check (default: all)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not (out / layout.MANIFEST).is_file():
        conversion = conversion_above(out)
        advice = (f": it is a folder inside the conversion {conversion}; check that: python -m tools.verify_converted "
                  f"{conversion}" if conversion else " (not a conversion: give the converter's --out folder)")
        print(f"error: {out} holds no {layout.MANIFEST}{advice}", file=sys.stderr)
        return 2
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    try:
        problems = verify(out, splits)
    except DataError as exc:  # not JSON, or not shaped like a converter manifest
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    files = sum(len(e.get("files", [])) for s, e in layout.read_manifest(out).get("splits", {}).items()
                if not splits or s in splits)
    print(f"{'FAILED' if problems else 'ok'}: {files} files checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
