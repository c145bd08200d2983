"""The one source-tree index (``pipelines.image_folder``) and the one labeled-list rule
(``pipelines.labeled``): torchvision's ImageFolder order, nested folders, links, and the same
labeled list selecting the same images in the converter and in the loaders."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from pipelines.errors import DataError
from pipelines.format import layout
from pipelines.image_folder import index_image_folder, list_split
from pipelines.labeled import LabeledSpec, choose_labeled, match_list
from tests.helpers.imagefolder import make_image_folder
from tools.convert_imagenet import ConversionError, ConvertOptions, convert


def _nested_tree(root: Path) -> Path:
    split = root / "train"
    make_image_folder(split, ["cat", "dog"], 3, 16, seed=0)
    make_image_folder(split / "cat" / "inner", ["deeper"], 2, 16, seed=1)  # cat/inner/deeper/*.JPEG
    make_image_folder(split / "dog", ["a_sub"], 2, 16, seed=2)  # dog/a_sub/*.JPEG sorts before dog's own files
    (split / "dog" / "notes.txt").write_text("not an image")
    (split / "stray.JPEG").write_bytes(b"")
    return split


def test_listing_is_torchvision_imagefolders_order_nested_folders_included(tmp_path):
    split = _nested_tree(tmp_path)
    index = index_image_folder(split)
    reference = ImageFolder(str(split))
    assert list(index.classes) == reference.classes
    assert [(str(split / p), int(y)) for p, y in zip(index.paths, index.labels)] == reference.samples
    assert "dog/a_sub/a_sub_0.JPEG" in index.paths and "cat/inner/deeper/deeper_1.JPEG" in index.paths
    listing = list_split(split)
    assert {r["path"]: r["reason"] for r in listing.ignored} == {
        "stray.JPEG": "outside-class-folder", "dog/notes.txt": "not-an-image-extension"}


def test_a_symlink_loop_is_refused_naming_the_link(tmp_path):
    split = tmp_path / "train"
    make_image_folder(split, 2, 2, 16)
    os.symlink("..", split / "n00000000" / "loop")
    with pytest.raises(DataError, match=r"n00000000/loop leads to .*already listed \(the split folder\)"):
        index_image_folder(split)
    with pytest.raises(DataError, match="n00000000/loop"):
        list_split(split, ["n00000000", "n00000001"])


def test_a_second_link_to_a_listed_folder_is_refused_but_a_link_to_elsewhere_is_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    make_image_folder(elsewhere, ["extra"], 2, 16)
    split = tmp_path / "train"
    make_image_folder(split, 2, 2, 16)
    os.symlink(elsewhere / "extra", split / "n00000001" / "linked")
    index = index_image_folder(split)
    assert [p for p in index.paths if "linked" in p] == ["n00000001/linked/extra_0.JPEG", "n00000001/linked/extra_1.JPEG"]
    os.symlink(elsewhere / "extra", split / "n00000000" / "again")
    with pytest.raises(DataError, match=r"n00000001/linked leads to .*already listed \(n00000000/again\)"):
        index_image_folder(split)


def test_a_broken_link_is_listed_and_marked(tmp_path):
    split = tmp_path / "train"
    make_image_folder(split, 2, 2, 16)
    os.symlink(split / "gone.JPEG", split / "n00000001" / "broken.JPEG")
    index = index_image_folder(split)
    assert "n00000001/broken.JPEG" in index.paths and index.broken == ("n00000001/broken.JPEG",)


# --------------------------------------------------------------------------- labeled lists


def _twin_tree(root: Path) -> Path:
    """Two classes holding files of the same names (n_0.JPEG ...)."""
    for cls in ("a", "b"):
        make_image_folder(root / "train", [cls], 3, 16, seed=ord(cls))
        for i in range(3):
            (root / "train" / cls / f"{cls}_{i}.JPEG").rename(root / "train" / cls / f"n_{i}.JPEG")
    make_image_folder(root / "val", ["a", "b"], 1, 16, seed=9)
    return root


def test_bare_names_in_two_classes_are_ambiguous_and_a_path_never_falls_back_to_its_name():
    paths = ["a/n_0.JPEG", "a/n_1.JPEG", "b/n_0.JPEG", "b/only_b.JPEG"]
    subset = match_list(["# a comment", "", "n_1.JPEG", "n_0.JPEG", "a/only_b.JPEG", "b/n_0.JPEG", "n_1.JPEG"], paths)
    assert subset.indices == [1, 2]
    assert subset.ambiguous == ["n_0.JPEG"] and subset.missing == ["a/only_b.JPEG"] and subset.duplicates == 1


def test_the_same_list_selects_the_same_images_in_the_converter_and_the_loaders(tmp_path):
    root = _twin_tree(tmp_path / "src")
    good = tmp_path / "good.txt"
    good.write_text("# labeled\na/n_2.JPEG\nb/n_0.JPEG\nb/n_1.JPEG\n")
    out = tmp_path / "out"
    convert(ConvertOptions(src=str(root), out=str(out), formats=("dali",), labeled_list=str(good), jobs=1,
                           progress=False))
    converted = layout.read_labeled(out, "train")
    index = index_image_folder(root / "train")
    from_tree = choose_labeled(LabeledSpec(str(good), 0.1, 0), index.paths, index.labels, "train")
    assert converted == from_tree.tolist() == [2, 3, 4]

    for bad_line in ("n_0.JPEG", "a/missing.JPEG"):  # ambiguous, absent: refused by both
        bad = tmp_path / "bad.txt"
        bad.write_text(f"a/n_2.JPEG\n{bad_line}\n")
        with pytest.raises(ConversionError, match=bad_line.replace(".", r"\.")):
            convert(ConvertOptions(src=str(root), out=str(tmp_path / "out_bad"), formats=("dali",),
                                   labeled_list=str(bad), jobs=1, progress=False, overwrite=True))
        with pytest.raises(DataError, match=bad_line.replace(".", r"\.")):
            choose_labeled(LabeledSpec(str(bad), 0.1, 0), index.paths, index.labels, "train")


def test_the_stratified_draw_is_the_same_in_the_converter_and_the_loaders(tmp_path):
    root = tmp_path / "src"
    make_image_folder(root / "train", 3, [7, 5, 9], 16)
    make_image_folder(root / "val", 3, 1, 16, seed=1)
    convert(ConvertOptions(src=str(root), out=str(tmp_path / "out"), formats=("dali",), labeled_fraction=0.4,
                           seed=5, jobs=1, progress=False))
    index = index_image_folder(root / "train")
    from_tree = choose_labeled(LabeledSpec(None, 0.4, 5), index.paths, index.labels, "train")
    assert layout.read_labeled(tmp_path / "out", "train") == from_tree.tolist()
    assert np.bincount(index.labels[from_tree]).tolist() == [3, 2, 4]
