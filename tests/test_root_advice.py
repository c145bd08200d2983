"""A data folder of the wrong kind is refused naming the folder to pass and the backend that reads
it (issue 35): a conversion's ``dali/`` or ``ffcv/`` sub-folder given as ``data.root`` (the
README's pitfall; it was told to "convert it first"), a conversion where an ImageFolder tree is
read (the torch backend, the converter's ``--src``), a tree or its split folder where a
conversion is read (the FFCV backend)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.augment.recipe import SimCLRRecipe, ViewGroup
from pipelines.errors import DataError
from pipelines.labeled import LabeledSpec
from pipelines.spec import LoaderSpec
from pipelines.train_split import open_train_split
from tests.pretrain_helpers import make_split_tree, tiny_overrides
from tools import convert_imagenet, verify_converted
from train import pretrain


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_split_tree(tmp_path_factory.mktemp("advice") / "tree", classes=2, train_per_class=3,
                           val_per_class=1, size=16).resolve()


def _convert(tree: Path, out: Path, formats: str) -> Path:
    assert convert_imagenet.main(["--src", str(tree), "--out", str(out), "--splits", "train", "--formats", formats,
                                  "--jobs", "1", "--no-progress"]) == 0
    return out.resolve()


@pytest.fixture(scope="module")
def dali_only(tree, tmp_path_factory) -> Path:
    return _convert(tree, tmp_path_factory.mktemp("dali_only") / "conv", "dali")


@pytest.fixture(scope="module")
def both(tree, tmp_path_factory) -> Path:
    pytest.importorskip("ffcv", reason="pip install .[ffcv]")
    return _convert(tree, tmp_path_factory.mktemp("both") / "conv", "dali,ffcv")


def _spec(root: Path, backend: str) -> LoaderSpec:
    return LoaderSpec(backend=backend, root=root, train_split="train", labeled=LabeledSpec(None, 0.5, 0),
                      batch_size=2, support=None, views=(ViewGroup(2, SimCLRRecipe()),), seed=0, rank=0,
                      world_size=1, device=torch.device("cpu"), dtype=torch.float32)


def _refusal(root: Path, backend: str) -> str:
    with pytest.raises(DataError) as refused:
        open_train_split(_spec(root, backend))
    message = str(refused.value)
    assert "\n" not in message
    return message


def _names(message: str, setting: str) -> bool:
    """``message`` names ``setting`` (``data.root=/x``) whole, not as the start of a longer path."""
    return re.search(re.escape(setting) + r"(?=[ ,)]|$)", message) is not None


@pytest.mark.parametrize("inside", ["dali", "ffcv", "dali/train", "samples"])
@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_a_folder_inside_a_conversion_names_the_conversion(both, inside, backend):
    message = _refusal(both / inside, backend)
    assert f"is the {inside}/ folder inside the converted dataset {both}" in message
    assert _names(message, f"data.root={both}") and f"data.backend={backend} reads it" in message
    assert "convert it" not in message


def test_a_folder_inside_a_conversion_given_to_the_torch_backend(both, tree):
    message = _refusal(both / "dali", "torch")
    assert _names(message, f"data.root={both}") and "data.backend=ffcv or dali" in message
    assert _names(message, f"data.root={tree}") and "to keep data.backend=torch" in message  # the source tree


def test_a_conversion_without_the_backends_format(dali_only, tree):
    message = _refusal(dali_only, "ffcv")
    assert "set data.backend=dali, which reads it" in message and "--formats including ffcv" in message
    message = _refusal(dali_only / "dali", "ffcv")
    assert _names(message, f"data.root={dali_only}") and "data.backend=dali" in message
    message = _refusal(dali_only, "torch")
    assert "set data.backend=dali, which reads it" in message and _names(message, f"data.root={tree}")


def test_an_image_folder_tree_or_its_split_folder_given_to_the_ffcv_backend(tree):
    message = _refusal(tree, "ffcv")
    assert f"--src {tree} " in message and "data.backend=torch or dali" in message
    message = _refusal(tree / "train", "ffcv")
    assert f"the train/ folder of the ImageFolder tree {tree}" in message and f"--src {tree} " in message
    for backend in ("torch", "dali"):
        message = _refusal(tree / "train", backend)
        assert _names(message, f"data.root={tree}") and f"data.backend={backend} reads it" in message


def test_right_folders_open_and_a_tree_beside_a_conversions_outputs_is_no_part_of_it(dali_only, tree):
    own = dali_only / "my-tree"  # someone's folder in --out, next to the conversion's own folders
    shutil.copytree(tree, own)
    try:
        for root, backend in [(tree, "torch"), (tree, "dali"), (dali_only, "dali"), (own, "torch")]:
            assert len(open_train_split(_spec(root, backend)).index) == 6
    finally:
        shutil.rmtree(own)


def test_pretrain_on_a_conversions_dali_folder_names_the_conversion(both, tmp_path, capsys):
    """The issue's case, end to end: ``data.root=conv/dali`` with the FFCV backend."""
    overrides = tiny_overrides(both / "dali", tmp_path / "run") + ["data.backend=ffcv"]
    assert pretrain.main(["--device", "cpu", *[a for o in overrides for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and _names(err, f"data.root={both}") and "data.backend=ffcv reads it" in err


def test_the_converter_given_a_conversion_or_a_split_folder_as_src(dali_only, tree, tmp_path, capsys):
    for src in (dali_only, dali_only / "dali"):
        assert convert_imagenet.main(["--src", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--src takes an ImageFolder tree" in err and f"such as {tree}, the one it was converted from" in err
    assert convert_imagenet.main(["--src", str(tree / "train"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert f"set --src {tree}, the folder holding it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_verify_converted_on_a_folder_inside_a_conversion_names_it(dali_only, capsys):
    assert verify_converted.main([str(dali_only / "dali")]) == 2
    assert f"python -m tools.verify_converted {dali_only}" in capsys.readouterr().err
