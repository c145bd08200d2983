"""What curves.png draws, from metrics.csv's rows: unlabeled images seen and crops through the
network counted apart, the objective in full in the title, every loss component, the learning rate
from step 0, kNN with its chance line and a y range that holds both, resume points."""
from __future__ import annotations

from train.config import load_config
from train.curves import RunShape, curve_data, draw, objective_label
from train.run_files import METRIC_FIELDS

# SwAV + SuNCEt at the reproduction's small scale: 64 images x (2 + 6) crops, 10 classes x 2 images x
# 2 views of support; the figure counted its 552 crops a step as "images"
SWAV_SUNCET = ["loss.method=swav", "loss.suncet_weight=1", "data.unlabeled_batch_size=64",
               "augment.views=[{count: 2, resolution: 32}, {count: 6, resolution: 16}]", "data.support_classes=10",
               "data.support_images_per_class=2", "data.support_views=2", "run.output_dir=runs/swav_suncet",
               "model.arch=resnet18-small", "optim.epochs=6"]


def _row(**values) -> dict[str, str]:
    return {key: str(values[key]) if key in values else "" for key in METRIC_FIELDS}


def test_images_seen_and_crops_through_the_network_are_counted_apart():
    shape = RunShape.of(load_config(None, SWAV_SUNCET), world_size=1, steps_per_epoch=30, num_classes=10)
    assert shape.images_seen(60) == 60 * 64 == 3_840
    assert shape.crops_seen(60) == 60 * (8 * 64 + 10 * 2 * 2) == 33_120
    assert shape.name == "swav_suncet: swav + SuNCEt (weight 0.17), resnet18-small"  # 1 x 2.2 x 40 / 512
    two_ranks = RunShape.of(load_config(None, SWAV_SUNCET), world_size=2, steps_per_epoch=15, num_classes=10)
    assert two_ranks.images_seen(30) == 3_840 and two_ranks.crops_seen(30) == 33_120


def test_crops_follow_each_epochs_cost_when_suncet_stops():
    cfg = load_config(None, [*SWAV_SUNCET, "loss.supervised_epochs=1"])
    shape = RunShape.of(cfg, world_size=1, steps_per_epoch=30, num_classes=10)
    assert shape.crops_per_step == (552,) + (512,) * 5
    assert shape.crops_seen(45) == 30 * 552 + 15 * 512
    assert objective_label(cfg) == "swav + SuNCEt (weight 0.17, until epoch 1)"


def test_the_objective_is_named_in_full():
    assert objective_label(load_config(None, ["loss.suncet_weight=0"])) == "simclr"
    assert objective_label(load_config(None, ["loss.method=paws"])) == "paws"
    cfg = load_config(None, ["loss.suncet_weight_rule=fixed", "loss.suncet_weight=0.5"])
    assert objective_label(cfg) == "simclr + SuNCEt (weight 0.5)"


def _rows() -> list[dict[str, str]]:
    """A run of 2 epochs x 5 steps logged every 5 steps, kNN after each epoch, resumed at step 5."""
    return [
        _row(global_step=0, epoch=0, step=0, lr=0.1),
        _row(global_step=5, epoch=0, step=5, lr=0.4, loss=5.0, loss_ntxent=4.0, loss_suncet=0.9),
        _row(global_step=5, epoch=0, knn_top1=11.0, knn_top5=50.0),
        _row(global_step=5, epoch=1, step=0, resumed=1),
        _row(global_step=10, epoch=1, step=5, lr=0.05, loss=4.5, loss_ntxent=3.6, loss_suncet=0.8),
        _row(global_step=10, epoch=1, knn_top1=12.5, knn_top5=52.0),
    ]


def test_the_data_drawn_from_metrics_rows():
    shape = RunShape("run: simclr + SuNCEt (weight 1.1), resnet18-small", 8, (24, 16), 5, 10)
    data = curve_data(_rows(), shape)
    assert data.lr == ([0, 5, 10], [0.1, 0.4, 0.05])  # from step 0: the warm-up shows
    assert data.losses == {"loss": ([5, 10], [5.0, 4.5]), "loss_ntxent": ([5, 10], [4.0, 3.6]),
                           "loss_suncet": ([5, 10], [0.9, 0.8])}
    assert data.knn == ([5, 10], [11.0, 12.5])
    assert data.chance == 10.0
    low, high = data.knn_range
    assert low == 0 and 12.5 < high <= 20  # the points and chance, not 0-100 nor one point's noise
    assert data.resumed_at == [5]
    assert (data.last_step, data.images_seen, data.crops_seen) == (10, 80, 5 * 24 + 5 * 16)
    high_knn = curve_data([_row(global_step=5, epoch=0, knn_top1=95.0)], shape)
    assert high_knn.knn_range == (0.0, 100.0)


def test_the_figure_is_written(tmp_path):
    shape = RunShape("run: simclr, resnet18-small", 8, (16, 16), 5, 10)
    draw(curve_data(_rows(), shape), shape, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    only_start = curve_data([_row(global_step=0, epoch=0, step=0, lr=0.1)], shape)  # no loss, no kNN yet
    draw(only_start, shape, tmp_path / "start.png")
    assert (tmp_path / "start.png").is_file()
