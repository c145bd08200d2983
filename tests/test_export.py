"""Checkpoints that are safe to load, files that follow the umask, and the encoder export
(issue 15, parts 2 and 3)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from tests.pretrain_helpers import make_split_tree, tiny_config
from tools import export as export_tool
from train import checkpoint as ckpt
from train import evaluate, pretrain
from train.distributed import DistContext

CPU = DistContext(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A ResNet-18 (torchvision's) run at 16 px: its checkpoints and end-of-run export."""
    root = tmp_path_factory.mktemp("export")
    data = make_split_tree(root / "data", classes=4, train_per_class=6, val_per_class=2)
    old = os.umask(0o022)
    try:
        cfg = tiny_config(data, root / "run", **{"model.arch": "resnet18", "run.max_steps_per_epoch": 2,
                                                 "run.checkpoint_every_steps": 1})
        summary = pretrain.run(cfg, CPU)
    finally:
        os.umask(old)
    return dict(data=data, dir=root / "run", summary=summary)


def test_every_file_the_run_writes_loads_with_weights_only(run):
    files = ckpt.list_checkpoints(run["dir"]) + [Path(run["summary"]["encoder"])]
    assert len(files) >= 2 and files[-1].name == "encoder_resnet18_torchvision.pth"
    for path in files:
        torch.load(path, weights_only=True)  # raises on anything but tensors and plain types


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    ckpt.save_atomic({"rng": ckpt.rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_checkpoint_that_could_run_code_is_refused_by_name(tmp_path):
    torch.save({"model": {}, "config": {}, "payload": Path("x")}, tmp_path / "evil.pt")  # a pickled class
    with pytest.raises(ckpt.CheckpointError, match="evil.pt holds more than tensors"):
        ckpt.load(tmp_path / "evil.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "evil.pt"), "--data", str(tmp_path)]) == 2
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="notes.txt is not a readable checkpoint"):
        ckpt.load(tmp_path / "notes.txt")


def test_checkpoints_and_exports_follow_the_umask(run, tmp_path):
    for path in ckpt.list_checkpoints(run["dir"]) + [Path(run["summary"]["encoder"])]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    old = os.umask(0o077)
    try:
        ckpt.save_atomic({"x": torch.zeros(1)}, tmp_path / "private.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.pt").stat().st_mode) == 0o600


def test_the_export_loads_into_torchvision_with_only_fc_missing(run, tmp_path):
    assert export_tool.main(["--checkpoint", str(run["dir"]), "--out", str(tmp_path / "enc.pth")]) == 0
    model = torchvision.models.resnet18()
    missing, unexpected = model.load_state_dict(torch.load(tmp_path / "enc.pth", weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    newest, _ = ckpt.load_latest(run["dir"])
    assert torch.equal(model.conv1.weight, newest["model"]["encoder.conv1.weight"])
    assert export_tool.main(["--checkpoint", str(run["dir"]), "--out", str(tmp_path / "enc.pth")]) == 2  # exists


def test_safetensors_and_timm_formats(run, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file
    assert export_tool.main(["--checkpoint", str(run["dir"]), "--format", "safetensors",
                             "--out", str(tmp_path / "enc.safetensors")]) == 0
    model = torchvision.models.resnet18()
    missing, _ = model.load_state_dict(load_file(str(tmp_path / "enc.safetensors")), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"]
    assert export_tool.main(["--checkpoint", str(run["dir"]), "--format", "timm", "--out", str(tmp_path / "t.pth")]) == 0
    timm = pytest.importorskip("timm")
    missing, unexpected = timm.create_model("resnet18").load_state_dict(
        torch.load(tmp_path / "t.pth", weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_evaluate_accepts_an_exported_encoder_and_matches_the_checkpoint(run, tmp_path, capsys):
    export_tool.main(["--checkpoint", str(run["dir"]), "--out", str(tmp_path / "enc.pth")])
    settings = evaluate.EvalSettings(progress=False, num_workers=0, labeled_fraction=0.5)
    from_ckpt = evaluate.evaluate_checkpoint(run["dir"], run["data"], settings)
    from_export = evaluate.evaluate_checkpoint(tmp_path / "enc.pth", run["data"], settings)  # its sidecar says all
    assert (from_export["top1"], from_export["top5"]) == (from_ckpt["top1"], from_ckpt["top5"])
    assert evaluate.main(["--checkpoint", str(tmp_path / "enc.pth"), "--data", str(run["data"]),
                          "--arch", "resnet50", "--resolution", "16", "--no-progress"]) == 2
    assert "pass the --arch it was trained with" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["native", "safetensors"])
def test_a_small_model_with_its_own_normalisation_exports_and_evaluates_like_its_checkpoint(tmp_path, fmt):
    """The demo's case: resnet18-small (no torchvision counterpart) at 16 px with mean/std 0.5 and its
    run's labeled draw. The export carries all of it (issue 25: 90.36 % against 93.66 % before)."""
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    data = make_split_tree(tmp_path / "data", classes=4, train_per_class=6, val_per_class=3)
    cfg = tiny_config(data, tmp_path / "run", **{"run.max_steps_per_epoch": 2, "augment.mean": "[0.5, 0.5, 0.5]",
                                                 "augment.std": "[0.5, 0.5, 0.5]", "data.labeled_fraction": 0.5,
                                                 "run.seed": 7})
    summary = pretrain.run(cfg, CPU)
    assert Path(summary["encoder"]).name == "encoder_resnet18-small.pth"
    assert Path(summary["encoder"] + ".json").is_file()
    out = tmp_path / f"enc.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    assert export_tool.main(["--checkpoint", str(tmp_path / "run"), "--format", fmt, "--out", str(out)]) == 0
    settings = evaluate.EvalSettings(progress=False, num_workers=0)
    from_ckpt = evaluate.evaluate_checkpoint(tmp_path / "run", data, settings)
    from_export = evaluate.evaluate_checkpoint(out, data, settings)
    assert from_export == {**from_ckpt, "checkpoint": str(out)}
    assert export_tool.main(["--checkpoint", str(tmp_path / "run"), "--format", "torchvision",
                             "--out", str(tmp_path / "tv.pth")]) == 2  # no torchvision counterpart: refused


@pytest.mark.parametrize("arch", ["timm/resnet10t", "timm/vit_tiny_patch16_224"])
def test_a_timm_backbone_trains_exports_and_reloads_with_identical_features(tmp_path, arch):
    timm = pytest.importorskip("timm")
    data = make_split_tree(tmp_path / "data", classes=4, train_per_class=6, val_per_class=2, size=32)
    overrides = {"model.arch": arch, "augment.resolution": 32, "run.max_steps_per_epoch": 2,
                 "run.knn_every_epochs": 0, "augment.views": "[{count: 2}, {count: 2, resolution: 16}]"}
    summary = pretrain.run(tiny_config(data, tmp_path / "run", **overrides), CPU)
    name = arch.split("/")[1]
    assert Path(summary["encoder"]).name == f"encoder_timm-{name}_timm.pth"
    from train.export import load_encoder, load_pretrained

    model, cfg, _, _ = load_pretrained(tmp_path / "run")
    reloaded, info = load_encoder(summary["encoder"])
    assert info.arch == arch
    direct = timm.create_model(name, pretrained=False, num_classes=0, **(
        {"dynamic_img_size": True} if "vit" in name else {}))
    missing, unexpected = direct.load_state_dict(torch.load(summary["encoder"], weights_only=True), strict=False)
    assert not missing and not unexpected
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded(x), model.features(x))
    torch.testing.assert_close(direct.eval()(x), model.features(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- issue 35: every file checked first


@pytest.fixture()
def checkpoint(tmp_path):
    from tests.helpers.exports import training_checkpoint
    data = make_split_tree(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1, size=16)
    return training_checkpoint(tmp_path / "ckpt-000000010.pt", data)


def test_a_foreign_sidecar_beside_out_is_not_replaced_without_force(checkpoint, tmp_path, capsys):
    out = tmp_path / "enc.pth"
    (tmp_path / "enc.pth.json").write_text("someone else's notes\n")
    assert export_tool.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert f"{out}.json exists" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "enc.pth.json").read_text() == "someone else's notes\n"
    assert export_tool.main(["--checkpoint", str(checkpoint), "--out", str(out), "--force"]) == 0
    assert json.loads((tmp_path / "enc.pth.json").read_text())["arch"] == "resnet18-small"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_out_that_names_a_folder_is_refused(checkpoint, tmp_path, capsys, force):
    assert export_tool.main(["--checkpoint", str(checkpoint), "--out", f"{tmp_path}/newdir/", *force]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
    assert not (tmp_path / "newdir").exists()
    (tmp_path / "existing").mkdir()
    assert export_tool.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "existing"), *force]) == 2
    (tmp_path / "enc.pth.json").mkdir()  # a folder where the sidecar goes: refused even with --force
    assert export_tool.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "enc.pth"), *force]) == 2
    assert "enc.pth.json is a directory" in capsys.readouterr().err
    assert not (tmp_path / "enc.pth").exists()


# --------------------------------------------------------------------------- issue 35: what the run trained with


def test_the_sidecar_records_a_resolution_changed_on_resume(tmp_path, capsys):
    """A checkpoint whose config history (what the resume side is to record: one entry per start or
    resume) shows 16 px from step 0 and 32 px from step 4: the sidecar keeps both, evaluation says so."""
    from tests.helpers.exports import training_checkpoint
    from tests.pretrain_helpers import tiny_config
    from train.config import config_to_dict
    data = make_split_tree(tmp_path / "data", classes=2, train_per_class=3, val_per_class=1, size=16)
    history = [{"global_step": step, "config": config_to_dict(tiny_config(data, tmp_path / "run",
                                                                          **{"augment.resolution": side}))}
               for step, side in ((0, 16), (2, 16), (4, 32))]
    path = training_checkpoint(tmp_path / "ckpt-000000010.pt", data, history=history, **{"augment.resolution": 32})
    assert export_tool.main(["--checkpoint", str(path), "--out", str(tmp_path / "enc.pth")]) == 0
    side = json.loads((tmp_path / "enc.pth.json").read_text())
    assert side["resolution"] == 32 and side["trained_resolutions"] == [[0, 16], [4, 32]]
    evaluate.evaluate_checkpoint(tmp_path / "enc.pth", data, evaluate.EvalSettings(num_workers=0, progress=False,
                                                                                    knn_k=1))
    assert "16 px from step 0 to 4; 32 px from step 4 to 10" in capsys.readouterr().err
    plain = training_checkpoint(tmp_path / "ckpt-000000011.pt", data)  # no history recorded: unknown, no note
    assert export_tool.main(["--checkpoint", str(plain), "--out", str(tmp_path / "plain.pth")]) == 0
    assert json.loads((tmp_path / "plain.pth.json").read_text())["trained_resolutions"] == []


# --------------------------------------------------------------------------- issue 35: one public loader


@pytest.mark.parametrize("arch, fmt", [("resnet18", "torchvision"), ("resnet18", "timm"), ("resnet18", "safetensors"),
                                       ("resnet18-small", "native"), ("resnet18-small", "safetensors"),
                                       ("timm/resnet10t", "timm"), ("timm/resnet10t", "safetensors")])
def test_load_encoder_reads_every_format_back_with_the_checkpoint_features(tmp_path, arch, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    if arch.startswith("timm/"):
        pytest.importorskip("timm")
    from tests.helpers.exports import training_checkpoint
    from train.export import load_encoder, load_pretrained
    data = make_split_tree(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1, size=16)
    path = training_checkpoint(tmp_path / "ckpt-000000010.pt", data, **{"model.arch": arch, "augment.mean":
                                                                        "[0.5, 0.4, 0.3]"})
    out = tmp_path / f"enc.{fmt}"
    assert export_tool.main(["--checkpoint", str(path), "--format", fmt, "--out", str(out)]) == 0
    encoder, info = load_encoder(out)  # the README's way: no arch, no config
    assert not any(m.training for m in encoder.modules())
    assert (info.arch, info.resolution, info.mean) == (arch, 16, (0.5, 0.4, 0.3))
    model, cfg, _, _ = load_pretrained(path)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), model.features(x))  # channels-last against contiguous: ulps
    from PIL import Image

    from pipelines.augment.reference import eval_transform
    image = Image.fromarray((np.arange(20 * 24 * 3) % 251).astype(np.uint8).reshape(20, 24, 3))
    assert torch.equal(info.transform()(image), eval_transform(cfg.eval_recipe)(image))


def test_load_encoder_of_an_export_without_sidecar_needs_the_arch(tmp_path):
    from tests.helpers.exports import small_export
    from train.export import ExportError, load_encoder
    model, path = small_export(tmp_path)
    (tmp_path / "enc.pth.json").unlink()
    with pytest.raises(ExportError, match="pass arch="):
        load_encoder(path)
    encoder, info = load_encoder(path, "resnet18-small")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(encoder(x), model.features(x), rtol=0, atol=0)
    assert info.resolution == 224  # assumed, as documented
