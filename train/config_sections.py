"""The config's sections other than ``augment`` and ``loss``: what the run reads (``data``), builds
(``model``), optimises with (``optim``), how it runs and records (``run``) and computes (``compute``).

Each field is a ``setting``: its default, one line of meaning (``docs/CONFIG.md`` is generated
from them) and the values it may take, checked when the config loads. What the sections ask of
each other is checked in ``train.config_checks``.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.bad_images import POLICIES as BAD_IMAGE_POLICIES
from pipelines.settings import setting
from pipelines.spec import BACKENDS
from train.step import HOST_SYNCS

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
OPTIMIZERS = ("lars", "larc")
MAX_WIDTH = 16384  # head layers: 8 x the paper's 2048; a 16384 x 16384 layer alone holds 268 M weights
WIDTH_WHY = "a head layer's weights grow with its width squared: 16384 is 8 x the paper's 2048"


@dataclass
class DataConfig:
    backend: str = setting("torch", "loader: torch (an ImageFolder tree), dali (a converted folder or an ImageFolder "
                           "tree), ffcv (a converted folder)", choices=BACKENDS)
    root: str = setting("", "ImageFolder root holding <train_split>/ and <val_split>/, or the converter's --out "
                        "folder for dali and ffcv")
    train_split: str = setting("train", "sub-folder (or converted split) that is trained on")
    val_split: str = setting("val", "sub-folder (or converted split) the kNN monitor scores; absent: no monitor")
    labeled_list: str | None = setting(None, "the labeled subset: one relative path (or file name) per line, "
                                       "SimCLR's 10% list format; null: a draw of data.labeled_fraction")
    labeled_fraction: float = setting(0.1, "share of the train images that are labeled when labeled_list is null "
                                      "(class-stratified draw with run.seed)", low=0.0, low_open=True, high=1.0)
    unlabeled_batch_size: int = setting(44, "unlabeled images per step and rank; each gives every view of "
                                        "augment.views (2 by default)", low=2, low_why="NT-Xent needs negatives",
                                        high=8192, why="per rank: SimCLR's whole 4096-image batch is 2 x 4096 views")
    support_classes: int = setting(20, "C: classes of each step's support set (per rank with unique_classes, else "
                                   "shared by the ranks); 0: no support set", low=0, high=65536,
                                   why="support rows are classes x images x views per step")
    support_images_per_class: int = setting(2, "K: images of each support class per step and rank", low=1, high=1024,
                                             why="support rows are classes x images x views per step")
    support_views: int = setting(1, "V: augmented views of each support image (each a positive of the others)",
                                 low=1, high=64, why="each view is an image through the network")
    support_view_group: int = setting(0, "the view group (index into augment.views) whose recipe and resolution "
                                      "the support views take", low=0)
    unique_classes: bool = setting(False, "each rank draws its own support classes instead of sharing them")
    num_workers: int = setting(8, "DataLoader worker processes (torch backend) or threads (dali, ffcv) per rank",
                               low=0, high=256, why="processes or threads per rank")
    prefetch_factor: int = setting(2, "batches each worker prepares ahead", low=1, high=64,
                                   why="every prefetched batch is held in memory")
    knn_max_samples: int = setting(10000, "held-out images the kNN monitor scores (the first ones of val_split)",
                                   low=1, high=1_000_000, why="the monitor keeps every image's features in memory")
    on_bad_image: str = setting("error", "an image unreadable at training time: error names it and stops; skip "
                                "replaces it and counts it", choices=BAD_IMAGE_POLICIES)


@dataclass
class ModelConfig:
    arch: str = setting("resnet50", "encoder: resnet50, resnet18, resnet18-small (narrow, CIFAR stem: small images) "
                        "or timm/<name> (any timm model)")
    head_hidden_dim: int = setting(2048, "hidden width of the projection head", low=1, high=MAX_WIDTH, why=WIDTH_WHY)
    head_out_dim: int = setting(128, "output width of the projection head (SimCLR and SwAV: 128; PAWS: 2048)",
                                low=1, high=MAX_WIDTH, why=WIDTH_WHY)
    pred_hidden_dim: int | None = setting(None, "hidden width of PAWS's prediction head; null: head_out_dim // 4",
                                          low=1, high=MAX_WIDTH, why=WIDTH_WHY)
    sync_bn: bool = setting(True, "SyncBatchNorm across ranks (several ranks on CUDA)")
    sync_bn_group_size: int = setting(0, "ranks per SyncBN group, consecutive (SwAV's script: 8); 0: every rank",
                                      low=0)
    channels_last: bool = setting(True, "channels-last memory format on CUDA (faster convolutions with AMP)")


@dataclass
class OptimConfig:
    name: str = setting("lars", "lars: the suncet and PAWS code's LARS (biases and BatchNorm excluded from the trust "
                        "ratio and weight decay); larc: SwAV's SGD + LARC (every parameter adapted)",
                        choices=OPTIMIZERS)
    epochs: int = setting(500, "epochs of the schedule", low=1)
    start_lr: float = setting(0.6, "learning rate at step 0, rising linearly to lr over warmup_epochs", low=0.0)
    lr: float = setting(4.8, "peak learning rate, reached at the end of the warm-up", low=0.0, low_open=True)
    final_lr: float = setting(0.048, "learning rate at the last step (cosine decay from lr)", low=0.0)
    warmup_epochs: float = setting(10.0, "epochs of linear warm-up (fractions allowed); fewer than epochs", low=0.0)
    momentum: float = setting(0.9, "momentum of the optimizer", low=0.0, high=1.0, high_open=True)
    weight_decay: float = setting(1e-6, "weight decay", low=0.0)
    trust_coefficient: float = setting(0.001, "LARS / LARC trust coefficient (eta)", low=0.0, low_open=True)
    nesterov: bool = setting(False, "Nesterov momentum")


@dataclass
class RunConfig:
    output_dir: str = setting("runs/default", "run folder: checkpoints, metrics.csv, tb/, config.yaml, the encoder")
    seed: int = setting(0, "seed of every random draw (images, augmentations, labeled subset, weights)", low=0,
                        high=2 ** 32, high_open=True)
    precision: str = setting("auto", "auto: fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise",
                             choices=PRECISIONS)
    deterministic: bool = setting(False, "deterministic algorithms (slower; cudnn.benchmark off)")
    log_every_steps: int = setting(10, "steps per metrics.csv row (and progress line off a terminal)", low=1)
    checkpoint_every_steps: int = setting(500, "steps between mid-epoch checkpoints (one is also written at every "
                                          "epoch's end)", low=1)
    keep_checkpoints: int = setting(2, "newest checkpoints kept in the run folder", low=1)
    knn_every_epochs: int = setting(1, "epochs between kNN evaluations of the held-out split; 0: no kNN monitor",
                                    low=0)
    knn_k: int = setting(20, "neighbours of the kNN monitor", low=1)
    max_steps_per_epoch: int | None = setting(None, "truncate every epoch to this many steps (smoke tests, "
                                              "profiling); null: the whole epoch", low=1)
    progress_bar: bool = setting(True, "a progress bar on a terminal (one line per log step elsewhere)")
    logger: str = setting("none", "wandb: also send metrics to Weights & Biases (metrics.csv and TensorBoard always)",
                          choices=("none", "wandb"))
    preempt_signals: tuple[str, ...] = setting(("SIGTERM", "SIGUSR1"), "signals that make the run write a "
                                               "checkpoint and exit with code 143 (SLURM sends SIGTERM before "
                                               "preemption and at the time limit)")
    preempt_grace_s: float = setting(120.0, "seconds from the first such signal to a forced stop without a "
                                     "checkpoint, for a step that never ends", low=0.0, low_open=True)


@dataclass
class ComputeConfig:
    """How the training step runs on the device. None of these switches changes
    the maths: each is tested against the eager step (per-parameter LARS, a
    host sync every step, no compilation). Measure them with
    ``python -m tools.throughput --mode compute --step-variants ...``."""

    lars_foreach: bool = setting(False, "LARS as multi-tensor (torch._foreach_*) ops instead of a per-parameter loop")
    host_sync: str = setting("step", "step: the host waits for the device every step (loss and gradient checks); "
                             "log: only at log and checkpoint steps and epoch ends (a non-finite step is masked on "
                             "the device)", choices=HOST_SYNCS)
    max_host_lead_steps: int = setting(2, "with host_sync=log on CUDA: steps the host may run ahead of the device "
                                       "(0 with data.backend=ffcv)", low=0, high=64,
                                       why="every step ahead holds its batch on the device")
    compile: bool = setting(False, "torch.compile of the model's forward and the losses")
    cuda_graphs: bool = setting(False, "with compile: mode reduce-overhead (CUDA graphs); CUDA only")
    cudnn_benchmark: bool = setting(True, "cudnn.benchmark on CUDA (off anyway with run.deterministic)")
