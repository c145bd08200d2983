"""The config's sections other than ``augment`` and ``loss``: what the run reads (``data``), builds
(``model``), optimises with (``optim``), how it runs and records (``run``) and computes (``compute``).

Defaults live here; per-key and cross-section checks live in ``train.config_checks``.
"""
from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class DataConfig:
    backend: str = "torch"
    root: str = ""  # ImageFolder root holding <train_split>/ and <val_split>/, or a converted dir for dali/ffcv
    train_split: str = "train"
    val_split: str = "val"
    labeled_list: str | None = None  # one relative path (or file name) per line, SimCLR's 10% list format
    labeled_fraction: float = 0.1  # used when labeled_list is None: class-stratified draw with run.seed
    unlabeled_batch_size: int = 44  # per rank, images (each gives the views of augment.views: 2 by default)
    support_classes: int = 20  # C, per rank
    support_images_per_class: int = 2  # K
    support_views: int = 1  # V augmented views of each support image
    support_view_group: int = 0  # whose recipe (and resolution) the support views take: an index into augment.views
    unique_classes: bool = False  # each rank draws disjoint classes
    num_workers: int = 8
    prefetch_factor: int = 2
    knn_max_samples: int = 10000  # cap of the held-out set used by the kNN monitor
    on_bad_image: str = "error"  # an image unreadable at training time: "error" names it, "skip" replaces and counts it


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    head_hidden_dim: int = 2048
    head_out_dim: int = 128  # SimCLR and SwAV: 128; PAWS: 2048
    pred_hidden_dim: int | None = None  # PAWS's prediction head: head_out_dim // 4 when null
    sync_bn: bool = True  # SyncBatchNorm with several ranks on CUDA
    sync_bn_group_size: int = 0  # ranks per SyncBN group, consecutive (SwAV's script: 8); 0: every rank
    channels_last: bool = True


OPTIMIZERS = ("lars", "larc")


@dataclass
class OptimConfig:
    # "lars": the suncet and PAWS code's LARS (train.lars: biases and BatchNorm excluded from the trust
    # ratio and weight decay, lr inside the momentum buffer); "larc": SwAV's script, SGD + apex LARC
    # (train.larc: every parameter adapted and decayed, lr outside the momentum buffer)
    name: str = "lars"
    epochs: int = 500
    start_lr: float = 0.6
    lr: float = 4.8
    final_lr: float = 0.048
    warmup_epochs: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coefficient: float = 0.001
    nesterov: bool = False


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    precision: str = "auto"  # auto: fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise
    deterministic: bool = False
    log_every_steps: int = 10
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2
    knn_every_epochs: int = 1  # 0 disables the kNN monitor
    knn_k: int = 20
    max_steps_per_epoch: int | None = None  # truncate epochs (smoke tests, profiling)
    progress_bar: bool = True  # a bar on a terminal, one line per log step elsewhere
    logger: str = "none"  # "wandb": also send metrics to Weights & Biases (metrics.csv and TensorBoard always)
    # signals that make the run write a checkpoint and exit with code 143 (train.preemption); several
    # ranks agree at log steps. SLURM sends SIGTERM before preemption and at the time limit
    preempt_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")


@dataclass
class ComputeConfig:
    """How the training step runs on the device. None of these switches changes
    the maths: each is tested against the eager step (per-parameter LARS, a
    host sync every step, no compilation). Measure them with
    ``python -m tools.throughput --mode compute --step-variants ...``."""

    lars_foreach: bool = False  # LARS as multi-tensor (torch._foreach_*) ops instead of a per-parameter loop
    # "step": the host waits for the device every step (.item() checks of the loss, the gradients and
    # GradScaler's inf check). "log": only at log steps, checkpoint steps and epoch ends; a non-finite
    # step is masked on the device and loss.on_nonfinite acts at the next of those steps.
    host_sync: str = "step"
    # host_sync=log on CUDA: the host may run at most this many steps ahead of the device.
    # With data.backend=ffcv on CUDA it is 0 whatever is set (FFCV's pinned buffers need the sync).
    max_host_lead_steps: int = 2
    compile: bool = False  # torch.compile of the model's forward and the losses
    cuda_graphs: bool = False  # with compile: torch.compile mode "reduce-overhead" (CUDA graphs); CUDA only
    cudnn_benchmark: bool = True  # CUDA; off anyway with run.deterministic
