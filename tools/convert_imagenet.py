"""Convert an ImageNet-style ImageFolder tree into FFCV ``.beton`` files and DALI webdataset shards.

Usage::

    python -m tools.convert_imagenet --src DIR --out DIR [--splits train,val] [--formats ffcv,dali]
        [--labeled-list FILE | --labeled-fraction 0.1 --seed S] [--max-resolution 512]
        [--jpeg-quality 90] [--shard-size 1024] [--jobs N] [--strict] [--overwrite]

``--src`` holds ``<split>/<wnid>/*.JPEG``, listed by ``pipelines.image_folder``
(the index every loader uses). The output format is ``pipelines.format``; ``manifest.json`` accounts for every file seen
(``seen = written + skipped`` per split). Bad files (unreadable, empty, not
an image, truncated or corrupt, other extensions, files outside class
folders) are skipped and recorded, or with ``--strict`` stop the run. Files
that decode but are not RGB JPEGs (CMYK, grayscale, PNG named .JPEG, EXIF
rotated) are re-encoded for the DALI shards; the rest are copied byte for
byte.

Each split is written under temporary names and renamed when complete, so a
rerun skips the splits already done with the same settings from the same
source files, and redoes any partial one. Settings that differ from the
previous run in ``--out``, or source files that changed since (added, removed,
or another size or modification time), are refused unless ``--overwrite``
(which deletes the previous outputs).

Exit status: 0 when converted, 2 when refused (the one-line message says why).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipelines.errors import DataError
from pipelines.format import layout
from pipelines.format.manifest import (FORMAT_VERSION, file_record, new_manifest, settings_diff,
                                      split_is_complete, write_json)
from pipelines.format.root_advice import misplaced_source
from pipelines.image_folder import find_classes, list_split
from tools.convert.ffcv_beton import require_ffcv
from tools.convert.options import FORMATS, SPLIT_NAME, ConversionError, ConvertOptions
from tools.convert.source import source_changes, source_state
from tools.convert.split import claim_targets, convert_split, remove_targets
from train.run_lock import DirLock, RunDirError

log = logging.getLogger("tools.convert_imagenet")
CONVERT_LOCK = ".convert.lock"  # held in --out for the conversion's life (train.run_lock)
__all__ = ["ConversionError", "ConvertOptions", "FORMATS", "convert", "main"]  # options: tools/convert/options.py


# ---------------------------------------------------------------------------
# Top level
# ---------------------------------------------------------------------------

def convert(options: ConvertOptions) -> dict:
    """Run the conversion described by ``options`` and return the manifest."""
    src, out = Path(options.src), Path(options.out)
    if not src.is_dir():
        raise ConversionError(f"--src {src} is not a directory")
    misplaced = misplaced_source(src, options.splits)  # a conversion, or a split folder: what to pass instead
    if misplaced:
        raise ConversionError(misplaced)
    missing = [s for s in options.splits if not (src / s).is_dir()]
    if missing:
        raise ConversionError(f"--src {src} has no folder for split(s) {missing} named by --splits")
    if options.labeled_list is not None and not Path(options.labeled_list).is_file():
        raise ConversionError(f"--labeled-list {options.labeled_list} is not a file")
    if "ffcv" in options.formats:
        try:
            require_ffcv()
        except ImportError as e:
            raise ConversionError(str(e)) from e

    classes = find_classes([src / s for s in options.splits])
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file; give a directory (new, or a previous conversion)")
    try:
        lock = DirLock(out, CONVERT_LOCK, "--out", "conversion")  # two converters would write one file twice
    except RunDirError as e:
        raise ConversionError(str(e)) from None
    try:
        return _convert(options, src, out, classes)
    except OSError as e:  # the output cannot be written: read-only, full, no permission
        raise ConversionError(f"cannot write the conversion to --out {out}: {e}") from e
    finally:
        lock.release()


def _convert(options: ConvertOptions, src: Path, out: Path, classes: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    manifest = _open_manifest(out, options.settings(classes), options.overwrite)
    write_json(out / layout.LABELS, {"classes": classes, "class_to_idx": {c: i for i, c in enumerate(classes)}})
    manifest["labels_file"] = file_record(out / layout.LABELS, out)
    write_json(out / layout.MANIFEST, manifest)

    with _worker_pool(options.jobs) as pool:
        for split in options.splits:
            if split_is_complete(manifest["splits"].get(split), out):
                _check_source_unchanged(split, src / split, out, classes, manifest["splits"][split])
                log.info("%s: already converted with these settings from the same source files, skipping", split)
                continue
            outputs = claim_targets(out, split, manifest["splits"].get(split))
            manifest["splits"][split] = {"complete": False, "outputs": outputs}  # ours to delete on a rerun
            write_json(out / layout.MANIFEST, manifest)
            manifest["splits"][split] = convert_split(split, src / split, out, classes, options, pool)
            write_json(out / layout.MANIFEST, manifest)
            log.info("%s", _summary(split, manifest["splits"][split]))
    log.info("%s", _holdings(out, manifest))
    return manifest


def _check_source_unchanged(split: str, split_dir: Path, out: Path, classes: list[str], entry: dict) -> None:
    """Refuse to call a complete split done when its source files changed since it was converted."""
    listing = list_split(split_dir, classes)
    seen = listing.paths + [r["path"] for r in listing.ignored]
    recorded = entry.get("source")
    if recorded is None:
        log.warning("%s: converted by an older version that did not record its source files; cannot tell whether "
                    "they changed (pass --overwrite to reconvert)", split)
        return
    if source_state(split_dir, seen) != recorded:
        before = [s["path"] for s in layout.read_samples(out, split)] + [s["path"] for s in entry.get("skipped", [])]
        raise ConversionError(f"{split_dir} changed since it was converted ({source_changes(before, seen)}): the "
                              "conversion is stale; pass --overwrite to reconvert it")


def _open_manifest(out: Path, settings: dict, overwrite: bool) -> dict:
    """The previous manifest when its settings match, else a new one. Other settings replace a
    previous conversion only with ``--overwrite``, or when none of its splits was completed
    (a refused or interrupted first attempt holds nothing to protect). Replacing deletes only
    the files the previous manifest records; a folder without a manifest holds nothing of ours."""
    path = out / layout.MANIFEST
    if not path.exists():
        if os.path.lexists(out / layout.LABELS):
            raise ConversionError(f"--out {out} holds {layout.LABELS} but no {layout.MANIFEST}: not a conversion this "
                                  "converter wrote, and it would overwrite that file; choose another --out")
        manifest = new_manifest(settings)
        write_json(path, manifest)
        return manifest
    previous = layout.read_manifest(out)
    diff = settings_diff(previous.get("settings", {}), settings)
    if previous.get("format_version") != FORMAT_VERSION:
        diff.append(f"format_version: {previous.get('format_version')!r} -> {FORMAT_VERSION} (an older converter)")
    if not diff and not overwrite:
        return previous
    done = [split for split, entry in previous["splits"].items() if entry.get("complete")]
    if done and not overwrite:
        raise ConversionError(
            f"--out {out} holds a conversion ({', '.join(done)}) with other settings; use another --out or "
            "pass --overwrite to delete it. Differences: " + "; ".join(diff))
    bad = [split for split in previous["splits"] if not SPLIT_NAME.fullmatch(split)]
    if bad:
        raise ConversionError(f"{path} names split {bad[0]!r}, which is no folder name: not a manifest this converter "
                              "wrote; move --out's contents away or choose another --out")
    for split, entry in previous["splits"].items():
        claim_targets(out, split, entry)  # every file there must be one it records, before anything is deleted
    for split in previous["splits"]:
        remove_targets(out, split)
    (out / layout.LABELS).unlink(missing_ok=True)
    for name in layout.OUTPUT_DIRS:  # their folders, when nothing else is left in them
        try:
            (out / name).rmdir()
        except OSError:
            pass
    manifest = new_manifest(settings)
    write_json(path, manifest)
    return manifest


# ---------------------------------------------------------------------------
# Parallelism, progress, summary
# ---------------------------------------------------------------------------

@contextmanager
def _worker_pool(jobs: int) -> Iterator:
    if jobs == 1:
        yield None
        return
    with multiprocessing.Pool(jobs) as pool:
        yield pool


def _summary(split: str, entry: dict) -> str:
    n = entry["counts"]
    text = (f"{split}: seen {n['seen']}, written {n['written']} ({n['reencoded']} re-encoded), "
            f"skipped {n['skipped']}; {entry['images_per_second']} files/s")
    reasons = Counter(s["reason"] for s in entry["skipped"])
    if reasons:
        text += "\n  skipped: " + ", ".join(f"{r} {k}" for r, k in reasons.most_common())
        text += "".join(f"\n    {s['path']}: {s['reason']}" for s in entry["skipped"][:10])
        if len(entry["skipped"]) > 10:
            text += f"\n    ... {len(entry['skipped']) - 10} more in manifest.json"
    if entry["empty_classes"]:
        text += f"\n  classes without images: {', '.join(entry['empty_classes'])}"
    labeled = entry["labeled"]
    if labeled:
        text += f"\n  labeled subset: {labeled['count']} samples"
        for key in ("missing", "unavailable", "ambiguous"):
            if labeled[key]:
                text += f"; {len(labeled[key])} listed names {key}"
    return text


def _holdings(out: Path, manifest: dict) -> str:
    """The last line: the folder to train on and the bytes it holds, per format and split."""
    sizes = {name: Counter() for name in (*layout.FORMAT_DIRS, "listings")}  # format -> split -> bytes
    for split, entry in manifest["splits"].items():
        for record in entry["files"] if entry.get("complete") else []:
            sizes[layout.format_of(record["path"])][split] += record["bytes"]
    listings = (sizes.pop("listings").total() + manifest.get("labels_file", {}).get("bytes", 0)
                + (out / layout.MANIFEST).stat().st_size)
    parts = []
    for name, by_split in sizes.items():
        if by_split:
            shards = {s: len(manifest["splits"][s]["dali_shards"]) for s in by_split} if name == "dali" else {}
            parts.append(f"{name} {_size(by_split.total())} (" + ", ".join(
                f"{s} {_size(n)}" + (f" in {shards[s]} shard{'s' * (shards[s] != 1)}" if shards else "")
                for s, n in by_split.items()) + ")")
    total = listings + sum(by_split.total() for by_split in sizes.values())
    return f"output: {out} ({_size(total)}; pass this folder as data.root): {', '.join(parts)}, listings {_size(listings)}"


def _size(nbytes: float) -> str:
    """``nbytes`` in decimal units: ``812 B``, ``25.2 MB``."""
    if nbytes < 1000:
        return f"{int(nbytes)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        nbytes /= 1000
        if round(nbytes, 1) < 1000:
            break
    return f"{nbytes:.1f} {unit}"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.convert_imagenet", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", required=True, help="ImageFolder root holding <split>/<wnid>/*.JPEG")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--splits", default="train,val", help="comma-separated split folders to convert")
    p.add_argument("--formats", default="ffcv,dali", help="comma-separated subset of ffcv,dali")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--labeled-list", help="SimCLR-style list (10percent.txt): one file name or <wnid>/<file> per line")
    group.add_argument("--labeled-fraction", type=float, help="class-stratified draw of this fraction (>= 1 per class)")
    p.add_argument("--labeled-split", default=ConvertOptions.labeled_split, help="split the labeled subset is taken from")
    p.add_argument("--seed", type=int, default=ConvertOptions.seed, help="seed of the --labeled-fraction draw")
    p.add_argument("--max-resolution", type=int, default=ConvertOptions.max_resolution, help="FFCV: longest image side (downscaled only)")
    p.add_argument("--jpeg-quality", type=int, default=ConvertOptions.jpeg_quality, help="FFCV JPEG quality, also used for DALI re-encodes")
    p.add_argument("--compress-probability", type=float, default=ConvertOptions.compress_probability,
                   help="FFCV 'proportion' mode: share of images stored as JPEG, the rest raw")
    p.add_argument("--shard-size", type=int, default=ConvertOptions.shard_size, help="DALI: most samples per shard")
    p.add_argument("--shard-multiple", type=int, default=ConvertOptions.shard_multiple,
                   help="DALI: shard count is rounded up to a multiple of this, for balance across ranks (on a "
                        "small split, of its largest divisor that keeps shards at least half of --shard-size)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--strict", action="store_true", help="stop at the first bad file instead of skipping it")
    p.add_argument("--allow-missing", action="store_true",
                   help="convert even when --labeled-list names files that are absent, ambiguous (a bare name in "
                        "several class folders) or unreadable; they are left out of the labeled subset and "
                        "recorded in manifest.json")
    p.add_argument("--overwrite", action="store_true", help="delete what a previous conversion wrote in --out and start afresh (needed when its settings differ)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        options = ConvertOptions(
            src=args.src, out=args.out, splits=_csv(args.splits), formats=_csv(args.formats),
            labeled_list=args.labeled_list, labeled_fraction=args.labeled_fraction, labeled_split=args.labeled_split,
            seed=args.seed, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
            compress_probability=args.compress_probability, shard_size=args.shard_size,
            shard_multiple=args.shard_multiple, jobs=args.jobs, strict=args.strict, allow_missing=args.allow_missing, overwrite=args.overwrite,
            progress=not args.no_progress)
    except ValueError as e:
        parser.error(str(e))
    try:
        convert(options)
    except (ConversionError, DataError) as e:  # refused: the input or output is not usable as given
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


if __name__ == "__main__":
    sys.exit(main())
