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
from pipelines.format.manifest import size_mismatch
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


def open_converted(root: str | Path, split: str) -> ConvertedSplit:
    """Check that ``root`` holds a complete conversion of ``split`` and read its listing."""
    root = Path(root)
    manifest = layout.read_manifest(root)
    entry = manifest["splits"].get(split)
    if not entry or not entry.get("complete"):
        raise DataError(f"split {split!r} of {root} is missing or incomplete (see manifest.json); "
                        f"rerun {CONVERT_HINT}")
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
    source = Path(manifest.get("settings", {}).get("src", root)) / split
    index = ImageFolderIndex(source, tuple(classes), tuple(s["path"] for s in samples),
                             np.asarray([s["label"] for s in samples], dtype=np.int64))
    return ConvertedSplit(root, split, index, labeled, entry)
