"""The images ``train.evaluate`` reads: the labeled subset of the train split and the held-out split.

Every path comes from the folder the user names (``--data``): split names cannot climb out of
it, and the labeled list an export's sidecar names is read only from inside it (a downloaded
export must not make a tool read, or print, a local file). A conversion's ``dali/`` or
``ffcv/`` sub-folder given as ``--data`` is answered with the folder to pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from pipelines.augment.reference import eval_transform
from pipelines.errors import DataError
from pipelines.eval_data import EvalImages, capped_ids, open_split_images
from pipelines.format.converted import is_converted, open_converted
from pipelines.labeled import LabeledSpec, choose_labeled
from train.config import PretrainConfig
from train.data import labeled_spec
from train.encoder_info import shown
from train.eval_settings import EvalSettings, check_split_name


@dataclass
class EvalData:
    labeled: Dataset  # eval transform
    labeled_augmented: Dataset  # fine-tuning transform
    val: Dataset
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def finetune_transform(resolution: int, mean, std) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(resolution, scale=(0.08, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def list_inside(listed: str, root: Path, sidecar: Path) -> Path:
    """The labeled list an export's ``sidecar`` names, as a file inside ``root`` (relative names are
    taken from there); ``DataError`` when it is not one, without reading it."""
    candidate = Path(listed) if Path(listed).is_absolute() else root / listed
    try:
        inside = candidate.resolve(strict=True).is_relative_to(root.resolve()) and candidate.is_file()
    except (OSError, RuntimeError):  # missing, a link loop
        inside = False
    if not inside:
        raise DataError(f"{sidecar} names the labeled list {shown(listed)}, which is not a file inside --data "
                        f"{root} (an export's list is read only from there); pass --labeled-list FILE (the run's "
                        "list) or --labeled-fraction F")
    return candidate


def labeled_for(cfg: PretrainConfig, s: EvalSettings, root: Path, paths, labels, where: str,
                listed_by: Path | None = None) -> np.ndarray:
    """The run's labeled-subset rule (``pipelines.labeled.choose_labeled``), with --labeled-list
    or --labeled-fraction taking precedence when given. ``listed_by``: the sidecar the config's
    list comes from (an export), whose list must lie inside ``root`` and whose errors do not quote it."""
    spec = labeled_spec(cfg)
    converted = open_converted(root, s.train_split or cfg.data.train_split).labeled if is_converted(root) else None
    if s.labeled_list is not None:
        spec, listed_by = LabeledSpec(s.labeled_list, spec.fraction, spec.seed), None
    elif s.labeled_fraction is not None:
        spec, converted, listed_by = LabeledSpec(None, s.labeled_fraction, spec.seed), None, None
    elif listed_by is not None and spec.list_file:
        spec = LabeledSpec(str(list_inside(spec.list_file, root, listed_by)), spec.fraction, spec.seed)
    else:
        listed_by = None
    try:
        return choose_labeled(spec, paths, labels, where, converted)
    except DataError:
        if listed_by is None:
            raise
        raise DataError(f"the labeled list {spec.list_file} named by {listed_by} does not select images of "
                        f"{where}; pass --labeled-list FILE or --labeled-fraction F") from None


def refuse_conversion_sub_folder(root: Path) -> None:
    """Refuse a conversion's sub-folder (``conv/ffcv``, ``conv/dali``, ``conv/dali/train``) as
    ``--data``, naming the folder to pass."""
    if is_converted(root):
        return
    for up in (root.parent, root.parent.parent):
        if is_converted(up):
            raise DataError(f"--data {root} is inside the conversion {up} (tools.convert_imagenet's --out): pass "
                            f"--data {up}")


def build_eval_data(cfg: PretrainConfig, root: Path, s: EvalSettings, listed_by: Path | None = None) -> EvalData:
    """Labeled train subset and held-out split of ``root`` (an ImageFolder tree, or a conversion's shards)."""
    d = cfg.data
    train_split, val_split = s.train_split or d.train_split, s.val_split or d.val_split
    check_split_name(train_split, "--train-split" if s.train_split else "the run's data.train_split")
    check_split_name(val_split, "--val-split" if s.val_split else "the run's data.val_split")
    recipe = cfg.eval_recipe
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    refuse_conversion_sub_folder(root)
    train, val = open_split_images(root, train_split), open_split_images(root, val_split)
    if val.index.classes != train.index.classes:
        raise DataError(f"class folders of {val.index.root} differ from those of {train.index.root}")
    labeled = labeled_for(cfg, s, root, train.index.paths, train.labels, str(train.index.root), listed_by)
    aug = finetune_transform(recipe.resolution, recipe.mean, recipe.std)
    return EvalData(EvalImages(train, labeled, eval_transform(recipe)), EvalImages(train, labeled, aug),
                    EvalImages(val, capped_ids(len(val), s.val_max_samples, s.seed), eval_transform(recipe)),
                    tuple(train.index.classes))
