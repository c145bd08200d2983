"""The one index of an ImageFolder source tree, used by the converter and every loader.

``<split>/<class>/.../<image>``: the same files, in the same order, with the
same labels, wherever the tree is read. The rules, as torchvision's
``ImageFolder`` has them, plus what it leaves unsaid:

- classes are the sorted names of the split's sub-folders (links to folders
  count); labels are positions in that list (or in a list the caller gives,
  e.g. the union over splits);
- a class's images are found *recursively*: files in nested folders belong to
  the class whose folder holds them (torchvision's ``make_dataset`` walks with
  ``followlinks=True``). Order: folders by path, then files by name, exactly
  ``sorted(os.walk(...))``;
- an image is a file whose name ends in one of ``IMAGE_EXTENSIONS`` (any case);
  other files, and files directly in the split folder, are *ignored* and
  reported (``SplitListing.ignored``) so that nothing goes unaccounted for;
- symbolic links are followed, and every real folder is listed at most once: a
  link that leads to a folder already listed (a loop such as ``ln -s ..``, or a
  second link to the same folder) is refused with ``DataError`` naming it,
  rather than listing the same images again under one label;
- a link to a file that does not exist (a broken link) stays in the listing,
  marked in ``broken``: the converter records it as unreadable, the loaders
  refuse it at start (or count it with ``data.on_bad_image: skip``);
- hidden names (starting with ``.``: ``.ipynb_checkpoints``, ``.DS_Store``,
  ``.git``) are neither classes nor images, at any depth, and are reported as
  ignored: an empty hidden class folder would otherwise shift every label;
- an image name that is not a regular file (a named pipe, a socket, a device)
  is ignored and reported (``not-a-regular-file``): opening a pipe would block
  a reader forever.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.errors import DataError

# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageFolderIndex:
    """Sorted (path, label) listing of one split, in ImageFolder order."""

    root: Path
    classes: tuple[str, ...]
    paths: tuple[str, ...]  # relative to root: "<class>/<file>" or "<class>/<sub>/<file>"
    labels: np.ndarray  # int64, one per path
    broken: tuple[str, ...] = ()  # paths (as in ``paths``) that are links to nothing

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class SplitListing:
    """Everything found in one split folder."""

    paths: list[str]  # images, relative to the split folder, in ImageFolder order
    labels: list[int]
    ignored: list[dict] = field(default_factory=list)  # {"path", "reason", "detail"}: not images, or no class
    empty_classes: list[str] = field(default_factory=list)  # class folders holding no image
    broken: list[str] = field(default_factory=list)  # image paths that are links to nothing


def find_classes(split_dirs: list[Path]) -> list[str]:
    """Sorted union of the class folder names of the given split folders."""
    names: set[str] = set()
    for split_dir in split_dirs:
        split_dir = Path(split_dir)
        if not split_dir.is_dir():
            raise DataError(f"data split directory not found: {split_dir}")
        with os.scandir(split_dir) as entries:
            names.update(e.name for e in entries if e.is_dir() and not hidden(e.name))
    return sorted(names)


def hidden(name: str) -> bool:
    """Names that are neither classes nor images (module docstring)."""
    return name.startswith(".")


def regular_or_broken(entry: os.DirEntry) -> bool:
    """A regular file (links followed), or a link to nothing (listed as broken): not a pipe or device."""
    try:
        return entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path))
    except OSError:
        return False


def _walk_class(class_dir: Path, split_dir: Path, visited: dict[str, str]) -> list[tuple[str, list[os.DirEntry]]]:
    """``(folder relative to split_dir, its file entries)`` for ``class_dir`` and every folder
    below it (depth first, by name), each real folder once. ``visited`` maps the real path of
    every folder listed so far (and of the split folder) to the name it was listed under; a
    folder whose real path is there, or is an ancestor of the split folder, is refused."""
    found = []

    def visit(folder: Path) -> None:
        rel = os.path.relpath(folder, split_dir)
        real = os.path.realpath(folder)
        if real in visited or os.path.commonpath([real, visited[SPLIT]]) == real:
            listed = visited.get(real, "an ancestor of the split folder")
            raise DataError(
                f"{folder} leads to {real}, already listed ({listed}): a symbolic link loop or a second link "
                "to the same folder would list its images again; remove the link")
        visited[real] = rel
        try:
            with os.scandir(folder) as entries:
                entries = sorted(entries, key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"cannot list folder {folder}: {exc}") from exc
        found.append((rel, [e for e in entries if not e.is_dir()]))  # files, and links to nothing
        for entry in entries:
            if entry.is_dir() and not hidden(entry.name):  # follows links
                visit(Path(entry.path))

    visit(class_dir)
    return sorted(found, key=lambda item: item[0])


SPLIT = ""  # the key of the split folder's own real path in ``visited``


def list_split(split_dir: str | os.PathLike, classes: list[str] | None = None) -> SplitListing:
    """List ``split_dir`` by the rules in the module docstring. ``classes`` (default:
    the split's own sub-folders) fixes the labels; a listed class without a folder
    here is an empty class."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"data split directory not found: {split_dir}")
    if classes is None:
        classes = find_classes([split_dir])
    listing = SplitListing([], [])
    with os.scandir(split_dir) as entries:
        entries = sorted(entries, key=lambda e: e.name)
    outside = [e.name for e in entries if not e.is_dir()]
    listing.ignored += [{"path": name, "reason": "outside-class-folder", "detail": None} for name in outside]
    listing.ignored += [{"path": e.name, "reason": "hidden-folder", "detail": None}
                        for e in entries if e.is_dir() and hidden(e.name)]
    visited = {SPLIT: os.path.realpath(split_dir)}
    visited[visited[SPLIT]] = "the split folder"
    for label, name in enumerate(classes):
        count = 0
        if (split_dir / name).is_dir():
            for folder, files in _walk_class(split_dir / name, split_dir, visited):
                for entry in sorted(files, key=lambda e: e.name):
                    rel = os.path.join(folder, entry.name) if folder != "." else entry.name
                    rel = rel.replace(os.sep, "/")
                    if hidden(entry.name) or not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                        reason = "hidden-file" if hidden(entry.name) else "not-an-image-extension"
                        listing.ignored.append({"path": rel, "reason": reason, "detail": None})
                        continue
                    if not regular_or_broken(entry):
                        listing.ignored.append({"path": rel, "reason": "not-a-regular-file", "detail": None})
                        continue
                    listing.paths.append(rel)
                    listing.labels.append(label)
                    count += 1
                    if entry.is_symlink() and not os.path.exists(entry.path):
                        listing.broken.append(rel)
        if count == 0:
            listing.empty_classes.append(name)
    return listing


def index_image_folder(root: str | os.PathLike) -> ImageFolderIndex:
    """The loaders' index of split folder ``root``: ``list_split`` with its own classes,
    refusing a split without class folders or with an empty class folder, by name."""
    root = Path(root)
    listing = list_split(root)
    classes = find_classes([root])
    if not classes:
        hint = ""
        for up in (root.parent, root.parent.parent):
            if (up / "manifest.json").is_file():  # inside a conversion: its --out folder is what to pass
                hint = (f"; {up} is a conversion by tools.convert_imagenet: pass it as data.root (data.root={up}), "
                        "not one of its sub-folders")
                break
        raise DataError(f"no class folders in {root} (expected ImageFolder layout <root>/<class>/<image>){hint}")
    if listing.empty_classes:
        raise DataError(f"class folder {root / listing.empty_classes[0]} holds no image files "
                        f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
    return ImageFolderIndex(root, tuple(classes), tuple(listing.paths),
                            np.asarray(listing.labels, dtype=np.int64), tuple(listing.broken))
