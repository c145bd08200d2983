"""The training split a run reads, and its labeled subset, by one rule for every backend.

``data.root`` is either an ImageFolder tree (``<root>/<split>/<class>/...``,
indexed by ``pipelines.image_folder``) or a conversion
(``tools.convert_imagenet`` output, read by ``pipelines.format.converted``).
The torch backend reads trees, FFCV reads conversions, DALI reads both; a
root of the wrong kind is refused with what to do instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.errors import DataError
from pipelines.format.converted import ConvertedSplit, is_converted, open_converted
from pipelines.format.root_advice import misplaced_root
from pipelines.image_folder import ImageFolderIndex, index_image_folder
from pipelines.labeled import choose_labeled
from pipelines.spec import LoaderSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSplit:
    """The samples of the training split (``index``), its labeled subset (sample
    indices), and the conversion they come from (None for an ImageFolder tree)."""

    index: ImageFolderIndex
    labeled: np.ndarray
    converted: ConvertedSplit | None


def check_root(root: Path | str, train_split: str, val_split: str | None = None) -> Path:
    """``data.root`` as a directory that exists, or a ``DataError`` saying what it is instead."""
    if not str(root):
        raise DataError(f"data.root is not set: point it at a directory holding {train_split}/"
                        f"{f' and {val_split}/' if val_split else ''} (ImageFolder layout or a converted dataset)")
    root = Path(root)
    if root.is_file():
        raise DataError(f"data.root {root} is a file; point it at a directory holding {train_split}/ "
                        "(ImageFolder layout or a converted dataset)")
    if not root.is_dir():
        raise DataError(f"data.root does not exist: {root}")
    return root


def open_train_split(spec: LoaderSpec) -> TrainSplit:
    """Index the training split of ``spec.root`` for ``spec.backend`` and choose its labeled subset."""
    root = check_root(spec.root, spec.train_split)
    misplaced = misplaced_root(root, spec.train_split, spec.backend)  # the folder and backend to use instead
    if misplaced:
        raise DataError(misplaced)
    converted = None
    if is_converted(root):
        converted = open_converted(root, spec.train_split)
        index = converted.index
    else:
        index = index_image_folder(root / spec.train_split)
        if index.broken and spec.on_bad_image == "error":
            shown = ", ".join(str(index.root / p) for p in index.broken[:3])
            raise DataError(f"{len(index.broken)} image(s) in {index.root} are symbolic links to nothing, e.g. "
                            f"{shown}; remove or fix them (or set data.on_bad_image=skip to skip and count them)")
    labeled = choose_labeled(spec.labeled, index.paths, index.labels, str(index.root),
                             converted.labeled if converted is not None else None)
    if converted is not None and converted.labeled is not None and not spec.labeled.list_file and spec.rank == 0:
        rule = (converted.settings.get("labeled") or {})
        if (rule.get("fraction"), rule.get("seed")) != (spec.labeled.fraction, spec.labeled.seed):
            log.warning("note: the labeled subset is the converter's (%d images of %s, %s), not a draw of "
                        "data.labeled_fraction=%s with run.seed=%s; set data.labeled_list to choose another",
                        len(labeled), spec.train_split, converted.labeled_rule(), spec.labeled.fraction,
                        spec.labeled.seed)
    return TrainSplit(index, labeled, converted)
