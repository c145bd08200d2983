"""``curves.png``: a run's metrics.csv in one figure, rewritten after every kNN evaluation and at
the end of the run.

Three panels against the global step: every loss component the run logs, the learning rate
(every logged row from step 0, so the warm-up shows) and kNN top-1 with chance (100 / classes)
drawn and the y range fitted to the points and chance. Each top axis counts the unlabeled images
seen (the global batch times the steps); the title names the run's objective in full and gives
both counts at the last step: unlabeled images seen, and crops through the network (every view
of every image and the support images: SwAV's multi-crop puts 8 crops of each image through).
Dotted lines mark the steps the run was resumed at.

``curve_data`` computes everything drawn from the rows (tested); ``draw`` only draws it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.checkpoint import write_atomic
from train.config import effective_suncet_weight
from train.run_files import LOSS_FIELDS, series

Series = tuple[list[int], list[float]]  # (global steps, values)


def objective_label(cfg) -> str:
    """The run's objective as the papers name it: ``simclr``, ``swav + SuNCEt (weight 0.17)``, ``paws``."""
    loss = cfg.loss
    if loss.method == "paws" or loss.suncet_weight <= 0:
        return loss.method
    until = "" if loss.supervised_epochs is None else f", until epoch {loss.supervised_epochs}"
    return f"{loss.method} + SuNCEt (weight {effective_suncet_weight(cfg):.2g}{until})"


@dataclass(frozen=True)
class RunShape:
    """What the curves need to know of a run beyond its metrics.csv."""

    name: str  # the run directory, the objective in full, the encoder
    images_per_step: int  # unlabeled images a global step sees, all ranks together
    crops_per_step: tuple[int, ...]  # images through the network in a global step of each epoch, all ranks
    steps_per_epoch: int
    num_classes: int  # of the kNN monitor: chance is 100 / num_classes %

    @classmethod
    def of(cls, cfg, world_size: int, steps_per_epoch: int, num_classes: int) -> RunShape:
        name = f"{Path(cfg.run.output_dir).name}: {objective_label(cfg)}, {cfg.model.arch}"
        crops = tuple(cfg.network_images_per_step(e) * world_size for e in range(cfg.optim.epochs))
        return cls(name, cfg.data.unlabeled_batch_size * world_size, crops, steps_per_epoch, num_classes)

    def images_seen(self, step: int) -> int:
        return step * self.images_per_step

    def crops_seen(self, step: int) -> int:
        """Crops through the network in the first ``step`` global steps, each epoch at its own cost."""
        total = 0
        for epoch, crops in enumerate(self.crops_per_step):
            total += max(0, min(step - epoch * self.steps_per_epoch, self.steps_per_epoch)) * crops
        return total + max(0, step - len(self.crops_per_step) * self.steps_per_epoch) * self.crops_per_step[-1]


@dataclass
class CurveData:
    """Everything ``draw`` puts in the figure."""

    losses: dict[str, Series]  # every loss column that holds a value, by name
    lr: Series
    knn: Series
    chance: float  # kNN top-1 of a random guess, in %
    knn_range: tuple[float, float]  # the kNN panel's y range: the points and chance, with room above
    resumed_at: list[int]
    last_step: int
    images_seen: int  # at the last step
    crops_seen: int  # at the last step
    title: str


def curve_data(rows: list[dict[str, str]], shape: RunShape) -> CurveData:
    """The figure's data from metrics.csv's rows (``train.run_files.read_metrics``)."""
    losses = {key: series(rows, key) for key in LOSS_FIELDS}
    knn = series(rows, "knn_top1")
    chance = 100.0 / shape.num_classes
    top = max([chance, *knn[1]])
    last = max((int(r["global_step"]) for r in rows), default=0)
    return CurveData(
        losses={key: s for key, s in losses.items() if s[0]}, lr=series(rows, "lr"), knn=knn, chance=chance,
        knn_range=(0.0, min(100.0, 1.25 * top + 2.0)), resumed_at=series(rows, "resumed")[0], last_step=last,
        images_seen=shape.images_seen(last), crops_seen=shape.crops_seen(last), title=shape.name)


def draw(data: CurveData, shape: RunShape, out: Path) -> None:
    """Write ``out`` (PNG) from ``data``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax, knn_ax) = plt.subplots(1, 3, figsize=(15, 4.8), sharex=True)
    for key, (steps, values) in data.losses.items():
        total = key == "loss"
        loss_ax.plot(steps, values, "-", lw=1.6 if total else 1.0, color="black" if total else None,
                     label="total" if total else key.removeprefix("loss_"))
    lr_ax.plot(*data.lr, "-", lw=1.2, marker="." if len(data.lr[0]) < 60 else None)
    knn_ax.plot(*data.knn, "o-", ms=4, lw=1.2, label="kNN top-1")
    knn_ax.axhline(data.chance, ls="--", lw=1, color="grey", label=f"chance ({data.chance:.3g}%)")
    knn_ax.set_ylim(*data.knn_range)
    if not data.knn[0]:
        knn_ax.text(0.5, 0.5, "no kNN evaluation yet", ha="center", transform=knn_ax.transAxes, color="grey")
    per_image = shape.images_per_step
    for ax, ylabel in ((loss_ax, "loss"), (lr_ax, "learning rate"), (knn_ax, "kNN top-1 (%)")):
        for i, step in enumerate(data.resumed_at):
            ax.axvline(step, ls=":", lw=1.2, color="tab:red", label="resumed" if i == 0 else None)
        ax.set_xlabel("global step")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, max(data.last_step, 1))
        ax.grid(alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_image, lambda n: n / per_image))
        top.set_xlabel("unlabeled images seen", fontsize=8)
        top.tick_params(labelsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{data.title}\nat step {data.last_step:,}: {data.images_seen:,} unlabeled images seen, "
                 f"{data.crops_seen:,} crops through the network (every view and support image)", fontsize=10)
    fig.tight_layout()
    write_atomic(out, lambda f: fig.savefig(f, dpi=100, format="png"), "curves")
    plt.close(fig)
