"""``open_converted``: the one reader of a split written by ``tools.convert_imagenet``.

It checks what every reader needs (a complete split in the manifest, a
sample listing numbered 0..N-1) and returns the listing as an
``ImageFolderIndex`` rooted at the *source* split folder (which may no longer
exist: the converted files are what gets read). A backend then asks for the
files of its format (``shards``, ``beton``), which are checked against the
sizes the converter recorded, so that a truncated or replaced file is named
when the run starts rather than read as garbage.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.errors import DataError
from pipelines.format import layout
from pipelines.format.manifest import record_problem, size_mismatch
from pipelines.image_folder import ImageFolderIndex

CONVERT_HINT = "python -m tools.convert_imagenet --src <ImageFolder root> --out <data.root>"


def is_converted(root: str | Path) -> bool:
    """Whether ``root`` is the output of the converter (holds a manifest)."""
    return (Path(root) / layout.MANIFEST).is_file()


@dataclass(frozen=True)
class ConvertedSplit:
    """One complete split of a conversion. ``labeled`` is the converter's labeled
    subset (sample indices), or None if it made none."""

    root: Path
    split: str
    index: ImageFolderIndex
    labeled: np.ndarray | None
    entry: dict  # the split's manifest entry
    settings: dict  # the conversion's settings (manifest.json)

    def labeled_rule(self) -> str:
        """How the converter chose ``labeled``, in words."""
        rule = self.settings.get("labeled") or {}
        if "list" in rule:
            return f"the list {rule['list']}"
        return f"fraction {rule.get('fraction')} with seed {rule.get('seed')}"

    def check_files(self, paths: list[Path]) -> None:
        """Refuse any of ``paths`` whose size differs from the one the converter recorded:
        it was truncated or replaced since. Files the manifest does not list are not checked."""
        records = {f["path"]: f for f in self.entry.get("files", [])}
        for path in paths:
            record = records.get(Path(path).relative_to(self.root).as_posix())
            mismatch = size_mismatch(self.root, record) if record is not None else None
            if mismatch:
                size = "missing" if mismatch[1] is None else f"{mismatch[1]} bytes"
                raise DataError(f"{path} is {size}, but the converter wrote {record['bytes']} bytes (see "
                                "manifest.json): truncated or replaced since; reconvert the dataset")

    def shards(self) -> tuple[list[Path], list[Path]]:
        """The split's DALI webdataset shards and their index files, checked."""
        tars, idx_files = layout.shard_files(self.root, self.split)
        if not tars:
            raise DataError(f"no DALI shards in {layout.shard_dir(self.root, self.split)}; convert with "
                            f"--formats including dali: {CONVERT_HINT}")
        missing = [p for p in idx_files if not p.is_file()]
        if missing:
            raise DataError(f"DALI index file(s) missing next to the shards, e.g. {missing[0]}; reconvert the dataset")
        self.check_files(tars + idx_files)
        return tars, idx_files

    def beton(self) -> Path:
        """The split's FFCV ``.beton``, checked (its header is the FFCV backend's to check)."""
        path = layout.beton_path(self.root, self.split)
        if not path.is_file():
            raise DataError(f"{path} not found; convert with --formats including ffcv: {CONVERT_HINT}")
        self.check_files([path])
        return path


def _check_small_files(root: Path, manifest: dict, entry: dict, split: str) -> None:
    """The listing files every reader trusts (labels, samples, labeled subset) must be the bytes
    the converter wrote: a hand edit would shift labels or pick other images without an error.
    They are small, so their sha256 is checked at every start (the big files' sizes are checked
    by ``check_files``; ``tools.verify_converted`` hashes those)."""
    records = {f["path"]: f for f in entry.get("files", [])}
    small = [manifest.get("labels_file")] + [records.get(p.relative_to(root).as_posix())
                                             for p in (layout.samples_path(root, split), layout.labeled_path(root, split))]
    for record in small:
        problem = record_problem(root, record) if record is not None else None
        if problem:
            raise DataError(f"{problem}: edited or replaced since conversion; reconvert the dataset (or restore the "
                            "file)")


def _check_ranges(root: Path, split: str, samples: list[dict], classes: list[str], labeled: np.ndarray | None) -> None:
    """Labels within the classes, labeled indices within the samples, ascending, once each."""
    bad = next((s for s in samples if not (isinstance(s.get("label"), int) and 0 <= s["label"] < len(classes))), None)
    if bad is not None:
        raise DataError(f"{layout.samples_path(root, split)}: sample {bad.get('index')} has label {bad.get('label')!r}, "
                        f"outside the {len(classes)} classes of {layout.LABELS}; reconvert the dataset")
    if labeled is not None and len(labeled) and (labeled.min() < 0 or labeled.max() >= len(samples)
                                                  or (np.diff(labeled) <= 0).any()):
        raise DataError(f"{layout.labeled_path(root, split)} must list ascending sample indices in [0, {len(samples)}) "
                        "once each; reconvert the dataset")


def open_converted(root: str | Path, split: str) -> ConvertedSplit:
    """Check that ``root`` holds a complete conversion of ``split`` and read its listing."""
    root = Path(root)
    manifest = layout.read_manifest(root)
    entry = manifest["splits"].get(split)
    if not entry or not entry.get("complete"):
        raise DataError(f"split {split!r} of {root} is missing or incomplete (see manifest.json); "
                        f"rerun {CONVERT_HINT}")
    _check_small_files(root, manifest, entry, split)
    try:
        samples = layout.read_samples(root, split)
        classes = layout.read_classes(root)
        labeled = (np.asarray(layout.read_labeled(root, split), dtype=np.int64)
                   if layout.labeled_path(root, split).is_file() else None)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise DataError(f"{root}: the sample listing of split {split!r} cannot be read ({type(exc).__name__}: "
                        f"{exc}); reconvert the dataset") from exc
    if [s.get("index") for s in samples] != list(range(len(samples))):
        raise DataError(f"{layout.samples_path(root, split)} does not list indices 0..{len(samples) - 1} in order")
    _check_ranges(root, split, samples, classes, labeled)
    source = Path(manifest.get("settings", {}).get("src", root)) / split
    index = ImageFolderIndex(source, tuple(classes), tuple(s["path"] for s in samples),
                             np.asarray([s["label"] for s in samples], dtype=np.int64))
    return ConvertedSplit(root, split, index, labeled, entry, manifest.get("settings", {}))
