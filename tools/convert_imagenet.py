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
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from tqdm import tqdm

from pipelines.errors import DataError
from pipelines.format import layout
from pipelines.format.manifest import (FORMAT_VERSION, file_record, new_manifest, settings_diff,
                                      split_is_complete, write_json)
from pipelines.image_folder import find_classes, list_split
from pipelines.labeled import LabeledSubset, match_list, stratified
from tools.convert.dali_shards import ShardTask, plan_shards, write_shard
from tools.convert.ffcv_beton import BetonSettings, require_ffcv, write_beton
from tools.convert.source import SKIP, SourceChanged, Verdict, inspect_file, source_changes, source_state

FORMATS = ("ffcv", "dali")
log = logging.getLogger("tools.convert_imagenet")


class ConversionError(RuntimeError):
    """The conversion cannot proceed; the message says why and what to do."""


@dataclass
class ConvertOptions:
    """The command-line options as a typed object; see ``build_parser`` for each one's meaning."""

    src: str
    out: str
    splits: tuple[str, ...] = ("train", "val")
    formats: tuple[str, ...] = FORMATS
    labeled_list: str | None = None
    labeled_fraction: float | None = None
    labeled_split: str = "train"
    seed: int = 0
    max_resolution: int = 512
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    shard_size: int = 1024
    shard_multiple: int = 64
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    strict: bool = False
    allow_missing: bool = False  # a labeled list may name absent, ambiguous or unreadable files (they are left out)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.splits = tuple(self.splits)
        self.formats = tuple(self.formats)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"--splits must name distinct splits, got {','.join(self.splits) or 'nothing'}")
        if not self.formats or not set(self.formats) <= set(FORMATS):
            raise ValueError(f"--formats must be a non-empty subset of {','.join(FORMATS)}, got {','.join(self.formats) or 'nothing'}")
        if self.labeled_list is not None and self.labeled_fraction is not None:
            raise ValueError("give --labeled-list or --labeled-fraction, not both")
        if self.labeled_fraction is not None and not 0 < self.labeled_fraction <= 1:
            raise ValueError(f"--labeled-fraction must be in (0, 1], got {self.labeled_fraction}")
        if self.max_resolution < 1:
            raise ValueError(f"--max-resolution must be >= 1, got {self.max_resolution}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}")
        if not 0 <= self.compress_probability <= 1:
            raise ValueError(f"--compress-probability must be in [0, 1], got {self.compress_probability}")
        if self.shard_size < 1 or self.shard_multiple < 1 or self.jobs < 1:
            raise ValueError(f"--shard-size, --shard-multiple and --jobs must be >= 1, got {self.shard_size}, "
                             f"{self.shard_multiple} and {self.jobs}")

    def settings(self, classes: list[str]) -> dict:
        """Everything the outputs depend on; a rerun in the same ``--out`` must match it."""
        labeled = None
        if self.labeled_list is not None:
            path = Path(self.labeled_list).resolve()
            labeled = {"split": self.labeled_split, "list": str(path),
                       "list_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        elif self.labeled_fraction is not None:
            labeled = {"split": self.labeled_split, "fraction": self.labeled_fraction, "seed": self.seed}
        return {
            "src": str(Path(self.src).resolve()),
            "formats": sorted(self.formats),
            "ffcv": {"write_mode": "proportion", "max_resolution": self.max_resolution,
                     "jpeg_quality": self.jpeg_quality, "compress_probability": self.compress_probability},
            "dali": {"shard_size": self.shard_size, "shard_multiple": self.shard_multiple,
                     "reencode_quality": self.jpeg_quality},
            "labeled": labeled,
            "classes": classes,
        }


# ---------------------------------------------------------------------------
# Top level
# ---------------------------------------------------------------------------

def convert(options: ConvertOptions) -> dict:
    """Run the conversion described by ``options`` and return the manifest."""
    src, out = Path(options.src), Path(options.out)
    if not src.is_dir():
        raise ConversionError(f"--src {src} is not a directory")
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
        return _convert(options, src, out, classes)
    except OSError as e:  # the output cannot be written: read-only, full, no permission
        raise ConversionError(f"cannot write the conversion to --out {out}: {e}") from e


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
            manifest["splits"][split] = {"complete": False}
            write_json(out / layout.MANIFEST, manifest)
            manifest["splits"][split] = _convert_split(split, src / split, out, classes, options, pool)
            write_json(out / layout.MANIFEST, manifest)
            log.info("%s", _summary(split, manifest["splits"][split]))
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
    (a refused or interrupted first attempt holds nothing to protect)."""
    path = out / layout.MANIFEST
    if path.exists():
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
    if path.exists() or overwrite:  # only what a conversion writes, never other files in --out
        for name in ("ffcv", "dali", "samples", "labeled"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (layout.MANIFEST, layout.LABELS):
            (out / name).unlink(missing_ok=True)
    manifest = new_manifest(settings)
    write_json(path, manifest)
    return manifest


# ---------------------------------------------------------------------------
# One split
# ---------------------------------------------------------------------------

class Accepted(NamedTuple):
    """A file that will be written; its position in the split's accepted list is its sample index."""

    source: str  # the file to read: --src / split / path
    path: str  # relative to the split folder
    label: int
    verdict: Verdict


@dataclass
class Inspection:
    accepted: list[Accepted]
    skipped: list[dict]  # {"path", "reason", "detail"}
    seen: int
    empty_classes: list[str]
    source: dict  # source_state of the listed files, to tell a stale conversion on a rerun


def _convert_split(split: str, split_dir: Path, out: Path, classes: list[str], options: ConvertOptions, pool) -> dict:
    start = time.perf_counter()
    found = _inspect_split(split, split_dir, classes, options, pool)
    timings = {"inspect": time.perf_counter() - start}
    labeled = _labeled_subset(split, found, options)

    _remove_split_outputs(out, split)
    staged: dict[Path, Path] = {}  # partial name -> final name; renamed once everything is written

    def stage(final: Path) -> Path:
        staged[_partial(final)] = final
        _partial(final).parent.mkdir(parents=True, exist_ok=True)
        return _partial(final)

    _write_samples(stage(layout.samples_path(out, split)), found.accepted)
    if labeled is not None:
        stage(layout.labeled_path(out, split)).write_text("".join(f"{i}\n" for i in labeled.indices))
    shards: list[dict] = []
    if "dali" in options.formats:
        t = time.perf_counter()
        shards = _write_dali(stage(layout.shard_dir(out, split)), out, split, found.accepted, options, pool)
        timings["dali"] = time.perf_counter() - t
    if "ffcv" in options.formats:
        t = time.perf_counter()
        try:
            write_beton(stage(layout.beton_path(out, split)), [(a.source, a.label) for a in found.accepted],
                        BetonSettings(options.max_resolution, options.jpeg_quality, options.compress_probability),
                        options.jobs)
        except SourceChanged as e:
            raise ConversionError(str(e)) from e
        timings["ffcv"] = time.perf_counter() - t
    for partial, final in staged.items():
        os.replace(partial, final)

    t = time.perf_counter()
    files = [file_record(p, out) for p in _listed_files(staged.values())]
    timings["checksums"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    reencoded = [{"index": i, "path": a.path, "reason": a.verdict.reason}
                 for i, a in enumerate(found.accepted) if a.verdict.reason]
    return {
        "complete": True,
        "counts": {"seen": found.seen, "written": len(found.accepted), "reencoded": len(reencoded),
                   "skipped": len(found.skipped)},
        "skipped": found.skipped,
        "reencoded": reencoded,
        "empty_classes": found.empty_classes,
        "source": found.source,
        "samples_file": layout.samples_path(out, split).relative_to(out).as_posix(),
        "labeled": None if labeled is None else {
            "file": layout.labeled_path(out, split).relative_to(out).as_posix(),
            "count": len(labeled.indices), "missing": labeled.missing, "unavailable": labeled.unavailable,
            "ambiguous": labeled.ambiguous, "duplicates": labeled.duplicates},
        "dali_shards": shards,
        "files": files,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "images_per_second": round(found.seen / timings["total"], 1),
    }


def _inspect_split(split: str, split_dir: Path, classes: list[str], options: ConvertOptions, pool) -> Inspection:
    """List the split and judge every candidate file (in ``pool``); ``--strict`` raises on the first bad one."""
    listing = list_split(split_dir, classes)
    if options.strict and listing.ignored:
        first = listing.ignored[0]
        raise ConversionError(f"--strict: {split_dir / first['path']}: {first['reason']}")
    if options.strict and listing.empty_classes:
        raise ConversionError(f"--strict: {split_dir / listing.empty_classes[0]}: empty-class-folder")

    sources = [str(split_dir / path) for path in listing.paths]
    accepted: list[Accepted] = []
    skipped = list(listing.ignored)
    verdicts = _ordered_map(pool, inspect_file, sources, 64, _bar(options, len(sources), f"{split}: inspect"))
    for path, label, source, verdict in zip(listing.paths, listing.labels, sources, verdicts):
        if verdict.action != SKIP:
            accepted.append(Accepted(source, path, label, verdict))
        elif options.strict:
            raise ConversionError(f"--strict: {source}: {verdict.reason} ({verdict.detail})")
        else:
            skipped.append({"path": path, "reason": verdict.reason, "detail": verdict.detail})
    if not accepted:
        raise ConversionError(f"{split_dir}: no usable image among {len(sources)} candidate files")
    state = source_state(split_dir, listing.paths + [r["path"] for r in listing.ignored])
    return Inspection(accepted, skipped, len(sources) + len(listing.ignored), listing.empty_classes, state)


def _write_samples(path: Path, accepted: list[Accepted]) -> None:
    with open(path, "w") as f:
        for index, a in enumerate(accepted):
            f.write(json.dumps({"index": index, "label": a.label, "path": a.path, "reencode": a.verdict.reason}) + "\n")


def _labeled_subset(split: str, found: Inspection, options: ConvertOptions) -> LabeledSubset | None:
    if split != options.labeled_split:
        return None
    if options.labeled_list is not None:
        lines = Path(options.labeled_list).read_text().splitlines()
        subset = match_list(lines, [a.path for a in found.accepted], {s["path"]: s["reason"] for s in found.skipped})
        problem = subset.problems()
        if problem and not options.allow_missing:
            raise ConversionError(f"--labeled-list {options.labeled_list} against {split}: {problem}; fix the list, "
                                  "or pass --allow-missing to convert without those entries")
        if not subset.indices:
            raise ConversionError(f"--labeled-list {options.labeled_list} names no usable image of {split}")
        return subset
    if options.labeled_fraction is not None:
        return LabeledSubset(stratified([a.label for a in found.accepted], options.labeled_fraction,
                                        options.seed).tolist())
    return None


def _write_dali(directory: Path, out: Path, split: str, accepted: list[Accepted], options: ConvertOptions,
                pool) -> list[dict]:
    """Write the shards into ``directory``; returns the shard records under their final names."""
    directory.mkdir()
    tasks = [ShardTask(str(directory), shard, r.start, [(a.source, a.label, a.verdict) for a in accepted[r.start:r.stop]],
                       options.jpeg_quality)
             for shard, r in enumerate(plan_shards(len(accepted), options.shard_size, options.shard_multiple))]
    bar = _bar(options, len(accepted), f"{split}: dali shards")
    results = []
    try:
        for result in (pool.imap_unordered(write_shard, tasks) if pool else map(write_shard, tasks)):
            results.append(result)
            bar.update(result["samples"])
    except SourceChanged as e:
        raise ConversionError(str(e)) from e
    finally:
        bar.close()
    final = layout.shard_dir(out, split).relative_to(out)
    return [{"tar": (final / r["tar"]).as_posix(), "idx": (final / r["idx"]).as_posix(),
             "samples": r["samples"], "first_index": r["first_index"]}
            for r in sorted(results, key=lambda r: r["first_index"])]


def _listed_files(finals: Iterable[Path]) -> list[Path]:
    """The given files, with folders replaced by the files they hold."""
    files = []
    for final in finals:
        files.extend(sorted(final.iterdir()) if final.is_dir() else [final])
    return files


def _remove_split_outputs(out: Path, split: str) -> None:
    """Delete a split's outputs and leftovers of an interrupted run, so it is redone from scratch."""
    for final in (layout.samples_path(out, split), layout.labeled_path(out, split),
                  layout.shard_dir(out, split), layout.beton_path(out, split)):
        for path in (final, _partial(final)):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _partial(final: Path) -> Path:
    return final.with_name(final.name + layout.PARTIAL)


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


def _ordered_map(pool, fn: Callable, items: Sequence, chunksize: int, bar: tqdm) -> Iterator:
    """``fn`` over ``items`` in order, in ``pool`` when there is one, advancing ``bar``."""
    results = pool.imap(fn, items, chunksize=chunksize) if pool else map(fn, items)
    try:
        for result in results:
            bar.update(1)
            yield result
    finally:
        bar.close()


def _bar(options: ConvertOptions, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not options.progress, file=sys.stderr)


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
    p.add_argument("--labeled-split", default="train", help="split the labeled subset is taken from")
    p.add_argument("--seed", type=int, default=0, help="seed of the --labeled-fraction draw")
    p.add_argument("--max-resolution", type=int, default=512, help="FFCV: longest image side (downscaled only)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="FFCV JPEG quality, also used for DALI re-encodes")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="FFCV 'proportion' mode: share of images stored as JPEG, the rest raw")
    p.add_argument("--shard-size", type=int, default=1024, help="DALI: most samples per shard")
    p.add_argument("--shard-multiple", type=int, default=64,
                   help="DALI: shard count is rounded up to a multiple of this, for balance across ranks")
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
