"""The ``loss`` section: the objective (``loss.method``), SuNCEt's weight and its rule, and the
settings of SwAV (``loss.swav``) and PAWS (``loss.paws``)."""
from __future__ import annotations

from dataclasses import dataclass, field

SUNCET_WEIGHT_RULES = ("fixed", "paper_ratio")


@dataclass
class SwAVConfig:
    """SwAV (Caron et al. 2020; facebookresearch/swav main_swav.py, scripts/swav_400ep_pretrain.sh)."""

    prototypes: int = 3000
    epsilon: float = 0.05  # Sinkhorn-Knopp's entropic regularisation
    sinkhorn_iterations: int = 3
    queue_length: int = 0  # embeddings kept from earlier steps (global, over ranks); 0: no queue
    queue_start_epoch: int = 15  # the queue starts filling at this epoch
    freeze_prototypes_steps: int = 313  # the prototypes get no update for this many global steps


@dataclass
class PAWSConfig:
    """PAWS (Assran et al. 2021; the official suncet repository's src/losses.py, configs/paws/imgnt_train.yaml)."""

    sharpen: float = 0.25  # target temperature T
    me_max: bool = True  # mean-entropy maximisation of the average prediction
    label_smoothing: float = 0.1


@dataclass
class LossConfig:
    method: str = "simclr"  # simclr (NT-Xent) | swav | paws; loss.suncet_weight adds SuNCEt to simclr and swav
    temperature: float = 0.1
    suncet_weight: float = 1.0  # 0 gives SimCLR alone
    # "paper_ratio": suncet_weight is scaled so that one support anchor weighs as much against one view
    # anchor as at the paper's per-GPU shapes (2.2x: 88 views, 40 support images); x1 at those shapes
    # (effective_suncet_weight; chosen on held-out images, RESULTS.md). "fixed": NT-Xent + suncet_weight x SuNCEt
    suncet_weight_rule: str = "paper_ratio"
    supervised_epochs: int | None = None  # SuNCEt switched off from this epoch on (None: never)
    # which NT-Xent rows carry gradient (train.losses.init_nt_xent_loss): "grad" every row (SimCLR's formula);
    # "official" only the anchors, every key a constant (the official SuNCEt code); "detached" a rank's own rows
    ntxent_gather: str = "grad"
    on_nonfinite: str = "stop"  # "stop" the run, or "skip" the step and count it
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    paws: PAWSConfig = field(default_factory=PAWSConfig)
