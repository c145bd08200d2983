"""An export's sidecar is input, not trust: it is checked like a config, and it never makes a tool
read (or print) a file outside the folder the user named."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from tests.helpers.exports import small_export, tamper_sidecar
from tests.pretrain_helpers import make_split_tree
from train import evaluate
from train.encoder_info import EncoderInfo, ExportError, parse_info, read_info

SECRET = "TOPSECRET:x:0:0:root:/root:/bin/bash"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_split_tree(tmp_path_factory.mktemp("data"), classes=3, train_per_class=4, val_per_class=2, size=16)


def _evaluate(export, data, *flags) -> int:
    return evaluate.main(["--checkpoint", str(export), "--data", str(data), "--num-workers", "0", "--no-progress",
                          "--k", "3", *flags])


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return captured.out + captured.err


# --------------------------------------------------------------------------- issue item 1: a sidecar's paths


@pytest.mark.parametrize("where", ["absolute", "relative", "link"])
def test_a_sidecar_cannot_make_evaluate_read_a_file_outside_data(tmp_path, data, capsys, where):
    secret = tmp_path / "passwd"
    secret.write_text(SECRET + "\n")
    root = data
    if where == "link":  # a link inside --data that points out of it
        root = tmp_path / "data_with_link"
        root.mkdir()
        for split in ("train", "val"):
            (root / split).symlink_to(data / split, target_is_directory=True)
        (root / "list.txt").symlink_to(secret)
    listed = {"absolute": str(secret), "relative": os.path.relpath(secret, data), "link": "list.txt"}[where]
    _, export = small_export(tmp_path, labeled_list=listed)
    assert _evaluate(export, root) == 2
    out = _one_line_error(capsys)
    assert "not a file inside --data" in out and "--labeled-list" in out
    assert "TOPSECRET" not in out


def test_a_sidecar_list_inside_data_is_used_and_its_errors_do_not_quote_it(tmp_path, data, capsys):
    listed = data / "ten_percent.txt"
    listed.write_text("n00000000_0.JPEG\nn00000001_1.JPEG\nn00000002/n00000002_2.JPEG\n")
    _, export = small_export(tmp_path, labeled_list="ten_percent.txt")
    out_json = tmp_path / "res.json"
    assert _evaluate(export, data, "--output", str(out_json)) == 0
    assert json.loads(out_json.read_text())["num_labeled"] == 3  # the list, read from inside --data
    (data / "notes.txt").write_text(SECRET + "\nanother line\n")
    tamper_sidecar(export, labeled_list="notes.txt")
    assert _evaluate(export, data) == 2
    out = _one_line_error(capsys)
    assert "does not select images" in out and "TOPSECRET" not in out


def test_a_list_the_user_names_is_still_read_from_anywhere(tmp_path, data):
    listed = tmp_path / "mine.txt"
    listed.write_text("n00000000_0.JPEG\nn00000001_1.JPEG\n")
    _, export = small_export(tmp_path, labeled_list="/elsewhere/list.txt")
    s = evaluate.EvalSettings(labeled_list=str(listed), num_workers=0, progress=False, knn_k=3)
    assert evaluate.evaluate_checkpoint(export, data, s)["num_labeled"] == 2


# --------------------------------------------------------------------------- item 2: tampered descriptions


@pytest.mark.parametrize("fields, named", [
    ({"arch": "../../x"}, "arch"),
    ({"arch": 5}, "arch"),
    ({"resolution": 2}, "resolution"),
    ({"resolution": 100000}, "resolution"),
    ({"resolution": "16"}, "resolution"),
    ({"resolution": True}, "resolution"),
    ({"std": [0, 0, 0]}, "std"),
    ({"std": [0.5, 0.5, float("inf")]}, "std"),
    ({"mean": ["a", "b", "c"]}, "mean"),
    ({"mean": [0.5, 0.5]}, "mean"),
    ({"mean": [float("nan")] * 3}, "mean"),
    ({"labeled_fraction": -1}, "labeled_fraction"),
    ({"labeled_fraction": 0}, "labeled_fraction"),
    ({"method": "byol"}, "method"),
    ({"seed": "x"}, "seed"),
    ({"seed": -1}, "seed"),
    ({"labeled_list": 3}, "labeled_list"),
    ({"global_step": -4}, "global_step"),
    ({"trained_resolutions": [[5, 16], [0, 32]]}, "trained_resolutions"),
    ({"classes": ["a", "a"]}, "classes"),
    ({"surprise": 1}, "surprise"),
    ({"arch": None}, "'arch' is missing"),
])
def test_every_tampered_field_is_a_one_line_refusal_naming_it_and_the_file(tmp_path, data, capsys, fields, named):
    _, export = small_export(tmp_path)
    tamper_sidecar(export, **fields)
    assert _evaluate(export, data) == 2
    out = _one_line_error(capsys)
    assert named in out and f"{export}.json" in out


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", "\"resnet50\""])
def test_a_sidecar_that_is_no_json_object_is_refused(tmp_path, data, capsys, text):
    _, export = small_export(tmp_path)
    (tmp_path / "enc.pth.json").write_text(text)
    assert _evaluate(export, data) == 2
    assert f"{export}.json" in _one_line_error(capsys)


def test_safetensors_metadata_is_checked_the_same_way(tmp_path, data, capsys):
    safetensors = pytest.importorskip("safetensors.torch")
    model, export = small_export(tmp_path, "enc.safetensors", "safetensors")
    (tmp_path / "enc.safetensors.json").unlink()  # the metadata alone describes it
    assert read_info(export) == EncoderInfo("resnet18-small", 16, (0.5,) * 3, (0.5,) * 3)
    tensors = safetensors.load_file(str(export))
    for name, meta in (("bad_json", "{oops"), ("bad_side", json.dumps({"arch": "resnet18-small", "resolution": 100000,
                                                                          "mean": [0.5] * 3, "std": [0.5] * 3}))):
        path = tmp_path / f"{name}.safetensors"
        safetensors.save_file(tensors, str(path), metadata={"arch": "resnet18-small", "encoder_info": meta})
        assert _evaluate(path, data) == 2
        assert str(path) in _one_line_error(capsys)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(export.read_bytes()[:40])  # a header cut short
    assert _evaluate(broken, data) == 2
    assert str(broken) in _one_line_error(capsys)


@pytest.mark.parametrize("side", ["4", "-5", "100000"])
def test_an_impossible_resolution_on_the_command_line_is_refused(tmp_path, data, capsys, side):
    _, export = small_export(tmp_path)
    assert _evaluate(export, data, "--resolution", side) == 2
    assert "--resolution must be in [8, 1024]" in _one_line_error(capsys)


def test_a_valid_description_round_trips_and_is_what_evaluation_uses(tmp_path):
    info = EncoderInfo("resnet18-small", 24, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "paws", "list.txt", 0.25, 7,
                       "runs/x", 12, ((0, 16), (8, 24)), ("cat", "dog"))
    tree = json.loads(json.dumps(dataclasses.asdict(info)))
    assert parse_info(tree, "x.json") == info
    with pytest.raises(ExportError, match="x.json: mean must be"):
        parse_info({**tree, "mean": [0.5, 0.4, 1.5]}, "x.json")
    _, export = small_export(tmp_path, resolution=24)
    loaded = evaluate.load_for_evaluation(export, None, None)
    assert loaded.cfg.eval_recipe.resolution == 24 and loaded.cfg.eval_recipe.mean == (0.5,) * 3
    x = torch.randn(2, 3, 24, 24)
    torch.testing.assert_close(loaded.model.features(x), small_export(tmp_path, "b.pth")[0].features(x))
