"""``train.evaluate``: kNN / linear probe on known geometry, and the CLI on a tiny run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.pretrain_helpers import make_split_tree, tiny_config
from train import evaluate, pretrain
from train.distributed import DistContext
from train.finetune import finetune_network, finetune_optimizer
from train.knn import knn_accuracy

CPU = DistContext(0, 1, 0, torch.device("cpu"))


def test_knn_on_known_geometry():
    # Four classes on the axes of R^4; each test point sits next to one axis.
    train_f = torch.eye(4).repeat(3, 1)
    train_y = torch.arange(4).repeat(3)
    test_f = F.normalize(torch.eye(4) + 0.1 * torch.ones(4, 4), dim=1)
    test_y = torch.tensor([0, 1, 2, 0])  # the last one is labeled against its geometry
    res = knn_accuracy(train_f, train_y, test_f, test_y, num_classes=4, k=3)
    assert res["knn_top1"] == pytest.approx(75.0)
    assert res["knn_top5"] == pytest.approx(100.0)
    # With k covering every training point, the 3 nearest (same class) still outvote the rest.
    res = knn_accuracy(train_f, train_y, test_f, test_y, num_classes=4, k=12)
    assert res["knn_top1"] == pytest.approx(75.0)


def test_linear_probe_learns_a_separable_toy_set():
    g = torch.Generator().manual_seed(0)
    centers = 3.0 * torch.randn(5, 16, generator=g)
    def blobs(n):
        y = torch.arange(5).repeat_interleave(n)
        return centers[y] + 0.5 * torch.randn(len(y), 16, generator=g), y
    train_x, train_y = blobs(20)
    test_x, test_y = blobs(10)
    probe = evaluate.fit_linear_probe(train_x, train_y, 5)
    assert evaluate.topk_accuracy(probe(train_x), train_y)["top1"] == 100.0
    assert evaluate.topk_accuracy(probe(test_x), test_y)["top1"] == 100.0


def test_topk_accuracy():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])
    res = evaluate.topk_accuracy(scores, torch.tensor([0, 0]))
    assert res == {"top1": 50.0, "top5": 100.0}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    data = make_split_tree(tmp_path_factory.mktemp("data"), classes=3, train_per_class=8, val_per_class=3, size=16)
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    cfg = tiny_config(data, run_dir, **{"optim.epochs": 1, "optim.warmup_epochs": 0.5, "run.knn_every_epochs": 0, "data.support_classes": 3})
    pretrain.run(cfg, CPU)
    return data, run_dir


def test_snn_on_a_hand_worked_case():
    # Two labeled points on the axes of R^2, classes 0 and 1; the query at 60 degrees from the first.
    support, labels = torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1])
    query = torch.tensor([[0.5, 0.5 * 3 ** 0.5]])  # cos 0.5 to class 0, cos 0.866 to class 1
    probs = evaluate.snn_probabilities(query, support, labels, num_classes=3, temperature=0.1)
    e0, e1 = torch.exp(torch.tensor(5.0)), torch.exp(torch.tensor(10 * 3 ** 0.5 / 2))
    torch.testing.assert_close(probs, torch.tensor([[e0 / (e0 + e1), e1 / (e0 + e1), 0.0]]))
    # two labeled rows of one class add up
    probs = evaluate.snn_probabilities(query, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),
                                       torch.tensor([0, 0, 1]), num_classes=2, temperature=0.1)
    torch.testing.assert_close(probs, torch.tensor([[2 * e0 / (2 * e0 + e1), e1 / (2 * e0 + e1)]]))


def test_finetune_starts_from_a_zero_classifier_and_steps_as_nesterov_sgd():
    """One step on two 2-d 'images' through an identity encoder, worked by hand: every logit
    starts at 0 (softmax 1/C), the weight gradient is (p - y)^T x / N, and Nesterov from zero
    momentum moves the weight by -lr (1 + momentum) g."""
    net = finetune_network(torch.nn.Identity(), 2, 3)
    assert (net[1].weight == 0).all()
    x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 2])
    bias = net[1].bias.detach().clone()
    torch.testing.assert_close(net(x).detach(), bias.expand(2, 3))  # the weight adds nothing yet
    opt = finetune_optimizer(net, lr=0.5)
    p = torch.softmax(bias.expand(2, 3), dim=1)  # the logits are the bias alone
    grad_w = (p - F.one_hot(y, 3).float()).T @ x / 2
    F.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(net[1].weight.grad, grad_w)
    opt.step()
    torch.testing.assert_close(net[1].weight.detach(), -0.5 * 1.9 * grad_w)
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[0]["nesterov"]


@pytest.mark.parametrize("method", ["knn", "snn", "linear", "finetune"])
def test_cli_evaluates_a_run_directory(trained_run, tmp_path, method, capsys):
    data, run_dir = trained_run
    out = tmp_path / "res.json"
    rc = evaluate.main(["--checkpoint", str(run_dir), "--data", str(data), "--method", method, "--k", "3",
                        "--epochs", "1", "--num-workers", "0", "--device", "cpu", "--no-progress",
                        "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["method"] == method and 0.0 <= res["top1"] <= res["top5"] <= 100.0
    assert res["num_val"] == 9 and res["num_labeled"] >= 3
    assert f"{method}: top-1" in capsys.readouterr().out


def test_cli_accepts_a_checkpoint_file_and_a_labeled_list(trained_run, tmp_path):
    data, run_dir = trained_run
    ckpt_file = sorted(run_dir.glob("ckpt-*.pt"))[-1]
    names = tmp_path / "labeled.txt"
    names.write_text("n00000000_0.JPEG\nn00000001_0.JPEG\nn00000002/n00000002_1.JPEG\n")
    s = evaluate.EvalSettings(method="knn", labeled_list=str(names), val_max_samples=5, knn_k=1, num_workers=0,
                              progress=False)
    res = evaluate.evaluate_checkpoint(ckpt_file, data, s)
    assert res["num_labeled"] == 3 and res["num_val"] == 5 and res["checkpoint"] == str(ckpt_file)


def test_cli_refuses_missing_checkpoint_and_split(trained_run, tmp_path, capsys):
    data, run_dir = trained_run
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pt"), "--data", str(data)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(run_dir), "--data", str(data), "--val-split", "test"]) == 2
    assert "test" in capsys.readouterr().err


def test_shard_dataset_reads_converted_tars_in_index_order(tmp_path):
    import numpy as np
    from PIL import Image

    from pipelines.encoded_images import shard_images
    from pipelines.eval_data import EvalImages
    from pipelines.format.converted import open_converted
    from tests.helpers.imagefolder import make_image_folder
    from tools.convert_imagenet import ConvertOptions, convert

    src = tmp_path / "src"
    paths = make_image_folder(src / "train", 2, 3, 16, seed=5)
    convert(ConvertOptions(src=str(src), out=str(tmp_path / "out"), splits=("train",), formats=("dali",),
                           shard_size=2, shard_multiple=1, jobs=1, progress=False))
    images = shard_images(open_converted(tmp_path / "out", "train"))
    ds = EvalImages(images, range(len(images)), transform=lambda im: np.asarray(im))
    assert len(ds) == 6 and images.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for i, path in enumerate(paths):  # ImageFolder order = sample index; RGB JPEG bytes are copied
        image, label = ds[i]
        assert label == i // 3
        assert np.array_equal(image, np.asarray(Image.open(path).convert("RGB")))

# --------------------------------------------------------------------------- issue 35: paths stay inside --data


def test_a_split_outside_data_is_refused(tmp_path, capsys):
    from tests.helpers.exports import small_export
    data = make_split_tree(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1, size=16)
    make_split_tree(tmp_path / "other", classes=2, train_per_class=2, val_per_class=1, size=16)  # readable, outside
    _, export = small_export(tmp_path)
    for flag, split in (("--val-split", "../other/val"), ("--train-split", str(tmp_path / "other" / "train"))):
        assert evaluate.main(["--checkpoint", str(export), "--data", str(data), flag, split, "--no-progress",
                              "--num-workers", "0"]) == 2
        assert f"{flag} {split!r} must name a folder inside --data" in capsys.readouterr().err


def test_a_conversion_sub_folder_as_data_names_the_folder_to_pass(tmp_path, capsys):
    from tests.helpers.exports import small_export
    from tools.convert_imagenet import ConvertOptions, convert
    src = make_split_tree(tmp_path / "src", classes=2, train_per_class=2, val_per_class=1, size=16)
    convert(ConvertOptions(src=str(src), out=str(tmp_path / "conv"), splits=("train", "val"), formats=("dali",),
                           shard_size=2, shard_multiple=1, jobs=1, progress=False))
    _, export = small_export(tmp_path)
    for sub in ("dali", "dali/train"):
        assert evaluate.main(["--checkpoint", str(export), "--data", str(tmp_path / "conv" / sub), "--no-progress",
                              "--num-workers", "0"]) == 2
        assert capsys.readouterr().err.strip().endswith(f"pass --data {tmp_path / 'conv'}")
    assert evaluate.main(["--checkpoint", str(export), "--data", str(tmp_path / "conv"), "--no-progress",
                          "--num-workers", "0", "--k", "1"]) == 0


def test_accuracies_are_exact_percentages_in_the_json():
    """47 of 250 right is 18.8 %, not float32's 18.799999356269836."""
    labels = torch.zeros(250, dtype=torch.long)
    scores = torch.zeros(250, 7)
    scores[:47, 0] = 1.0  # right
    scores[47:, 1] = 1.0  # wrong, but class 0 is in each row's top 5 (ties broken low)
    res = evaluate.topk_accuracy(scores, labels)
    assert json.dumps(res) == '{"top1": 18.8, "top5": 100.0}'
    assert knn_accuracy(F.normalize(torch.eye(3), dim=1), torch.arange(3), F.normalize(torch.eye(3), dim=1),
                        torch.tensor([0, 1, 0]), num_classes=3, k=1)["knn_top1"] == round(200 / 3, 4)


# --------------------------------------------------------------------------- issue 35: fine-tuning says what it does


def _val_accuracy_by_hand(model_path: Path, val_dir: Path) -> float:
    """Top-1 of a saved fine-tuned model on every image of ``val_dir``, read with PIL and prepared by
    its sidecar's transform, one image at a time (train.evaluate batches them through a DataLoader)."""
    from PIL import Image

    from train.export import load_encoder
    net, info = load_encoder(model_path, classifier=True)
    right = total = 0
    for label, cls in enumerate(info.classes):
        for image in sorted((val_dir / cls).iterdir()):
            with torch.no_grad():
                logits = net(info.transform()(Image.open(image).convert("RGB"))[None])
            right += int(logits.argmax(1).item() == label)
            total += 1
    return round(100.0 * right / total, 4)


def test_finetuning_logs_each_epoch_saves_its_model_and_notes_a_tiny_labeled_set(trained_run, tmp_path, capsys):
    data, run_dir = trained_run
    saved, out = tmp_path / "ft.pth", tmp_path / "res.json"
    args = ["--checkpoint", str(run_dir), "--data", str(data), "--method", "finetune", "--epochs", "3",
            "--num-workers", "0", "--no-progress", "--finetune-out", str(saved), "--output", str(out)]
    assert evaluate.main([*args, "--finetune-val-every", "2"]) == 0
    printed = capsys.readouterr()
    res = json.loads(out.read_text())
    log = res["finetune_log"]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert [e["val_top1"] is not None for e in log] == [False, True, True]  # every 2nd epoch, and the last
    for e in log:
        line = next(l for l in printed.out.splitlines() if l.startswith(f"fine-tune epoch {e['epoch']}/3:"))
        assert f"loss {e['loss']:.4f}" in line and f"train top-1 {e['train_top1']:.2f}%" in line
        assert e["loss"] > 0 and 0 <= e["train_top1"] <= 100 and e["lr"] > 0
    assert log[-1]["val_top1"] == res["top1"] and log[-1]["val_top5"] == res["top5"]
    assert res["finetuned_model"] == str(saved) and f"fine-tuned model saved: {saved}" in printed.out
    assert "so a result below kNN and the linear probe is expected" in printed.err  # 4 labeled images per class
    assert res["notes"] and res["notes"][0] in printed.out
    assert _val_accuracy_by_hand(saved, data / "val") == res["top1"]
    assert evaluate.main(args) == 2  # its own earlier model is not replaced: refused before any work
    assert f"{saved} and {saved}.json exist" in capsys.readouterr().err


def test_finetuning_saves_beside_the_checkpoint_by_default(trained_run, tmp_path, capsys):
    data, run_dir = trained_run
    ckpt_file = sorted(run_dir.glob("ckpt-*.pt"))[-1]
    copy = tmp_path / ckpt_file.name
    copy.write_bytes(ckpt_file.read_bytes())
    assert evaluate.main(["--checkpoint", str(copy), "--data", str(data), "--method", "finetune", "--epochs", "1",
                          "--num-workers", "0", "--no-progress", "--seed", "3"]) == 0
    assert f"fine-tuned model saved: {tmp_path / 'finetuned_suncet_seed3.pth'}" in capsys.readouterr().out
    assert (tmp_path / "finetuned_suncet_seed3.pth.json").is_file()


def test_scoring_between_epochs_does_not_change_what_fine_tuning_trains(trained_run):
    """The crops of a num_workers=0 loader come from the global RNG: scoring the held-out split
    after every epoch must not draw from it, or the result would depend on --finetune-val-every."""
    data, run_dir = trained_run
    logs = {}
    for every in (1, 0):
        s = evaluate.EvalSettings(method="finetune", finetune_epochs=2, finetune_val_every=every, num_workers=0,
                                  progress=False)
        res = evaluate.evaluate_checkpoint(run_dir, data, s)
        logs[every] = [(e["loss"], e["train_top1"]) for e in res["finetune_log"]], res["top1"], res["top5"]
    assert logs[1] == logs[0]
