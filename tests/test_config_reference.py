"""docs/CONFIG.md is what ``python -m train.config_reference`` writes today, every key has a
meaning and every number its limits, and the shipped small-scale config trains on a folder."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from pipelines.augment.recipe import ViewGroupSpec
from pipelines.settings import Limits, field_doc, field_limits
from train.config import PretrainConfig
from train.config_reference import reference

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_reference_is_current():
    """If this fails: python -m train.config_reference > docs/CONFIG.md"""
    assert (REPO / "docs" / "CONFIG.md").read_text() == reference()


def _fields(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield prefix + f.name, f, typing.get_type_hints(type(obj))[f.name]
        if dataclasses.is_dataclass(value):
            yield from _fields(value, f"{prefix}{f.name}.")


def test_every_key_says_what_it_means_and_every_number_its_limits():
    undocumented, unbounded = [], []
    for key, f, hint in _fields(PretrainConfig()):
        if not field_doc(f):
            undocumented.append(key)
        numeric = {int, float} & {hint, *typing.get_args(hint)} or (
            typing.get_origin(hint) is tuple and float in typing.get_args(hint))
        if numeric and field_limits(f) == Limits():
            unbounded.append(key)
    assert undocumented == [] and unbounded == []
    assert field_doc(dataclasses.fields(ViewGroupSpec)[0])  # count; the others are the recipe's keys


def test_the_keys_users_found_only_in_the_code_are_in_the_reference():
    text = (REPO / "docs" / "CONFIG.md").read_text()
    for key in ("run.checkpoint_every_steps", "run.knn_every_epochs", "run.keep_checkpoints",
                "run.max_steps_per_epoch", "augment.views[i]", "loss.swav.prototypes", "small_folder.yaml"):
        assert f"`{key}`" in text, key


def test_a_row_reads_the_field_it_documents():
    text = reference()
    assert ("| `loss.swav.prototypes` | int | `3000` | >= 1, <= 65536 | prototypes (clusters) of the swapped "
            "prediction |") in text
    assert "| `data.labeled_list` | string or null | `null` |  |" in text
    assert "| `augment.crop_scale` | [float, float] | `[0.08, 1]` | in (0, 1], low <= high |" in text


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_small_folder_config_trains_on_a_small_folder(tmp_path, capsys):
    """configs/small_folder.yaml as shipped, with only the folder, the run folder and the run's
    length set: its batch, resolution, model, support set and kNN monitor train and evaluate."""
    from tests.helpers.imagefolder import make_image_folder
    from train import pretrain

    make_image_folder(tmp_path / "data" / "train", 10, 8, 72, seed=0)
    make_image_folder(tmp_path / "data" / "val", 10, 2, 72, seed=1)
    run = tmp_path / "run"
    argv = ["--config", "small_folder", "--device", "cpu", "--set", f"data.root={tmp_path / 'data'}",
            "--set", f"run.output_dir={run}", "--set", "optim.epochs=1", "--set", "optim.warmup_epochs=0",
            "--set", "data.labeled_fraction=0.25", "--set", "data.num_workers=0", "--set", "run.knn_every_epochs=1", "--set", "run.progress_bar=false"]
    assert pretrain.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "final kNN top-1" in out and (run / "metrics.csv").is_file()
    assert "resolution: 64" in (run / "config.yaml").read_text()
