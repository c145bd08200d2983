"""What a data folder that a reader cannot use is instead, and the folder and backend to use.

The pitfalls (README, "Pre-training on ImageNet"): a folder inside a conversion, such as its
``dali/`` or ``ffcv/`` sub-folder, where the conversion's ``--out`` folder is meant; a
conversion where an ImageFolder tree is read (the torch backend, the converter's ``--src``);
an ImageFolder tree, or one of its split folders, where a conversion is read (the FFCV
backend). Each message names the folder to pass and the backend that reads it.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipelines.errors import DataError
from pipelines.format import layout
from pipelines.format.converted import CONVERT_HINT, is_converted
from pipelines.image_folder import hidden

# What each backend reads as data.root (pipelines.train_split).
READS = {"torch": "an ImageFolder tree", "dali": "a conversion with DALI shards, or an ImageFolder tree",
         "ffcv": "a conversion with a .beton"}


def conversion_above(path: Path | str) -> Path | None:
    """The conversion whose output folder (``layout.OUTPUT_DIRS``, or ``dali/<split>``, the deepest)
    ``path`` is, or None: a folder of someone's own beside them is no part of it."""
    absolute = Path(os.path.abspath(path))
    for up in list(absolute.parents)[:2]:
        if is_converted(up) and absolute.relative_to(up).parts[0] in layout.OUTPUT_DIRS:
            return up
    return None


def split_folder_of(folder: Path, split: str) -> Path | None:
    """The tree whose ``split`` folder ``folder`` is, when it was given for the tree itself: it is
    named ``split``, holds class folders and no ``split`` folder of its own. None otherwise."""
    if folder.name != split or (folder / split).exists() or not _has_class_folders(folder):
        return None
    return Path(os.path.abspath(folder)).parent


def misplaced_root(root: Path, split: str, backend: str) -> str | None:
    """Why ``backend`` cannot read the folder ``root`` as ``data.root`` (training on ``split``), and
    the folder and backend to use instead, in one line; None when it is the kind of folder that
    ``backend`` reads (its reader checks the rest)."""
    conversion = root if is_converted(root) else conversion_above(root)
    if conversion is not None:
        return _use_conversion(root, conversion, backend)
    tree = split_folder_of(root, split)
    if tree is not None:
        what = f"data.root {root} is the {split}/ folder of the ImageFolder tree {tree}"
        if backend == "ffcv":
            return f"{what}, and data.backend=ffcv reads a conversion: {_convert_tree(tree)}"
        return f"{what}: set data.root={tree}, the folder holding it (data.backend={backend} reads it)"
    if backend != "ffcv":
        return None
    if (root / split).is_dir():
        return (f"data.root {root} is an ImageFolder tree (no {layout.MANIFEST}), and data.backend=ffcv reads a "
                f"conversion: {_convert_tree(root)}")
    return (f"data.backend=ffcv reads a conversion, and {root} holds no {layout.MANIFEST}; convert an ImageFolder "
            f"tree first: {CONVERT_HINT} --formats ffcv")


def misplaced_source(src: Path, splits: tuple[str, ...]) -> str | None:
    """Why the converter cannot read ``src`` as ``--src`` (an ImageFolder tree holding ``splits``),
    and the folder to pass instead; None when it is not one of the known pitfalls."""
    conversion = src if is_converted(src) else conversion_above(src)
    if conversion is not None:
        where = "a converted dataset" if conversion == src else f"inside the converted dataset {conversion}"
        return (f"--src {src} is {where} (tools.convert_imagenet output), and --src takes an ImageFolder tree, "
                f"such as {_source_of(conversion)}, the one it was converted from")
    for split in splits:
        tree = split_folder_of(src, split)
        if tree is not None:
            return f"--src {src} is the {split}/ folder of an ImageFolder tree: set --src {tree}, the folder holding it"
    return None


def _use_conversion(root: Path, conversion: Path, backend: str) -> str | None:
    """The advice for a ``root`` that is ``conversion`` or a folder inside it."""
    formats = backends_of(conversion)
    if root == conversion and (backend in formats or not formats):
        return None  # the reader's own checks name anything else
    if root == conversion:
        what = f"data.root {root} is a converted dataset (--formats {','.join(formats)})"
        switch = f"set data.backend={' or '.join(formats)}, which {'reads' if len(formats) == 1 else 'read'} it"
    else:
        inside = Path(os.path.abspath(root)).relative_to(conversion).as_posix()
        what = f"data.root {root} is the {inside}/ folder inside the converted dataset {conversion}"
        if backend in formats or not formats:  # none: a manifest that cannot be read, named when it is opened
            reads = f" (data.backend={backend} reads it)" if formats else ""
            return f"{what}: set data.root={conversion}, the conversion itself{reads}"
        switch = f"set data.root={conversion} with data.backend={' or '.join(formats)}"
    if backend == "ffcv":
        keep = "reconvert with --formats including ffcv"
    else:
        keep = f"data.root={_source_of(conversion)} (the ImageFolder tree it was converted from)"
    return f"{what}, and data.backend={backend} reads {READS[backend]}: {switch}, or {keep} to keep data.backend={backend}"


def backends_of(conversion: Path) -> list[str]:
    """The backends that read ``conversion``: those named like the formats it was written in."""
    formats = _settings(conversion).get("formats")
    return [name for name in layout.FORMAT_DIRS if isinstance(formats, list) and name in formats]


def _settings(conversion: Path) -> dict:
    """The conversion's settings, or nothing when its manifest cannot be read (``open_converted`` says why)."""
    try:
        settings = layout.read_manifest(conversion).get("settings")
    except DataError:
        return {}
    return settings if isinstance(settings, dict) else {}


def _source_of(conversion: Path) -> str:
    source = _settings(conversion).get("src")
    if not isinstance(source, str) or not source:
        return "its source tree (not recorded)"
    return source if Path(source).is_dir() else f"{source} (no longer there)"


def _convert_tree(tree: Path) -> str:
    return (f"convert it (python -m tools.convert_imagenet --src {tree} --out <new folder> --formats ffcv) and set "
            f"data.root=<new folder>, or set data.backend=torch or dali, which read {tree} as it is")


def _has_class_folders(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(e.is_dir() and not hidden(e.name) for e in entries)
    except OSError:
        return False
