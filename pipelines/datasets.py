"""Locating ImageFolder splits and labeled subsets, with clear errors.

The labeled subset is either a file in SimCLR's ``10percent.txt`` format (one
file name, or path relative to the split root, per line) or a class-stratified
draw of ``fraction`` of each class from a seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """The data on disk does not match what the run needs."""


@dataclass(frozen=True)
class ImageFolderIndex:
    """Sorted (path, label) listing of an ImageFolder split, as torchvision orders it."""

    root: Path
    classes: tuple[str, ...]
    paths: tuple[str, ...]  # relative to root: "<class>/<file>"
    labels: np.ndarray  # int64, one per path

    def __len__(self) -> int:
        return len(self.paths)


def index_image_folder(root: str | os.PathLike) -> ImageFolderIndex:
    """List ``root/<class>/<image>`` like torchvision's ImageFolder, but refuse
    a missing root or an empty class folder by name instead of failing later."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data split directory not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f"no class folders in {root} (expected ImageFolder layout <root>/<class>/<image>)")
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = sorted(
            e.name for e in os.scandir(root / cls) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise DataError(
                f"class folder {root / cls} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                "remove it or add images"
            )
        paths.extend(f"{cls}/{name}" for name in files)
        labels.extend([label] * len(files))
    return ImageFolderIndex(root, tuple(classes), tuple(paths), np.asarray(labels, dtype=np.int64))


def read_converted_split(root: str | os.PathLike, split: str, convert_hint: str
                         ) -> tuple[ImageFolderIndex, np.ndarray | None]:
    """The sample listing of a complete ``tools.convert_imagenet`` split under ``root``
    (as an index rooted at the source split folder) and the converter's labeled
    subset (None if it wrote none). Backends check their own files on top."""
    from tools.convert import layout  # the converter's format, defined once

    root = Path(root)
    manifest_path = root / layout.MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{root} holds no {layout.MANIFEST}; convert the dataset first: {convert_hint}")
    manifest = layout.read_manifest(root)
    entry = manifest.get("splits", {}).get(split)
    if not entry or not entry.get("complete"):
        raise DataError(f"split {split!r} of {root} is missing or incomplete (see manifest.json); rerun {convert_hint}")
    samples = layout.read_samples(root, split)
    if [s["index"] for s in samples] != list(range(len(samples))):
        raise DataError(f"{layout.samples_path(root, split)} does not list indices 0..{len(samples) - 1} in order")
    source = Path(manifest.get("settings", {}).get("src", root)) / split
    index = ImageFolderIndex(source, tuple(layout.read_classes(root)), tuple(s["path"] for s in samples),
                             np.asarray([s["label"] for s in samples], dtype=np.int64))
    labeled = None
    if layout.labeled_path(root, split).is_file():
        labeled = np.asarray(layout.read_labeled(root, split), dtype=np.int64)
    return index, labeled


def check_converted_files(root: str | os.PathLike, split: str, paths: list[Path]) -> None:
    """Refuse any of ``paths`` whose size differs from the one the converter recorded
    in the manifest: it was truncated or replaced after conversion. Files the
    manifest does not list are not checked."""
    from tools.convert import layout
    from tools.convert.manifest import size_mismatch

    root = Path(root)
    entry = layout.read_manifest(root).get("splits", {}).get(split, {})
    records = {f["path"]: f for f in entry.get("files", [])}
    for path in paths:
        record = records.get(Path(path).relative_to(root).as_posix())
        mismatch = size_mismatch(root, record) if record is not None else None
        if mismatch:
            raise DataError(f"{path} is {mismatch[1]} bytes, but the converter wrote {record['bytes']} "
                            "(see manifest.json): truncated or replaced since; reconvert the dataset")


def read_labeled_list(list_file: str | os.PathLike, index: ImageFolderIndex) -> np.ndarray:
    """Sample indices named by ``list_file``: one file name (SimCLR's format,
    e.g. ``n01440764_10026.JPEG``) or relative path per line; blank lines and
    ``#`` comments ignored. Any name absent from the split is an error."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"labeled-subset file not found: {list_file}")
    by_path = {p: i for i, p in enumerate(index.paths)}
    by_name: dict[str, int] = {}
    for i, p in enumerate(index.paths):
        by_name.setdefault(p.split("/", 1)[1], i)
    chosen: list[int] = []
    missing: list[str] = []
    for line in list_file.read_text().splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        i = by_path.get(name.replace(os.sep, "/"), by_name.get(Path(name).name))
        if i is None:
            missing.append(name)
        else:
            chosen.append(i)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} name(s) in labeled-subset file {list_file} are not in {index.root}: {shown}")
    if not chosen:
        raise DataError(f"labeled-subset file {list_file} names no images")
    return np.unique(np.asarray(chosen, dtype=np.int64))


def stratified_subset(labels: np.ndarray, fraction: float, seed: int, min_per_class: int = 1) -> np.ndarray:
    """Draw ``fraction`` of each class (at least ``min_per_class``) without replacement."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = min(len(members), max(min_per_class, int(round(fraction * len(members)))))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))
