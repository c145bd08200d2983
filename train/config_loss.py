"""The ``loss`` section: the objective (``loss.method``), SuNCEt's weight and its rule, and the
settings of SwAV (``loss.swav``) and PAWS (``loss.paws``). Each field is a ``setting`` (meaning
and limits; see ``train.config_sections``)."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.settings import setting
from train.losses import GATHERS
from train.objectives import METHODS

SUNCET_WEIGHT_RULES = ("fixed", "paper_ratio")
PROTOTYPES_WHY = "the codes are (batch + queue) x prototypes per step; SwAV uses 3000"


@dataclass
class SwAVConfig:
    """SwAV (Caron et al. 2020; facebookresearch/swav main_swav.py, scripts/swav_400ep_pretrain.sh)."""

    prototypes: int = setting(3000, "prototypes (clusters) of the swapped prediction", low=1, high=65536,
                              why=PROTOTYPES_WHY)
    epsilon: float = setting(0.05, "Sinkhorn-Knopp's entropic regularisation", low=0.0113, low_open=True,
                             low_why="Sinkhorn takes exp(score / epsilon) of cosines up to 1: float32 overflows "
                                     "beyond exp(88.7)")
    sinkhorn_iterations: int = setting(3, "Sinkhorn-Knopp iterations per step", low=1, high=100,
                                       why="each is two passes over the codes, every step; SwAV uses 3")
    queue_length: int = setting(0, "embeddings kept from earlier steps (global, over ranks); 0: no queue", low=0,
                                high=65536, why="every queued row is scored against every prototype each step; "
                                                "SwAV's largest queue is 3840")
    queue_start_epoch: int = setting(15, "the queue starts filling at this epoch", low=0)
    freeze_prototypes_steps: int = setting(313, "the prototypes get no update for this many global steps", low=0)


@dataclass
class PAWSConfig:
    """PAWS (Assran et al. 2021; the official suncet repository's src/losses.py, configs/paws/imgnt_train.yaml)."""

    sharpen: float = setting(0.25, "target temperature T: targets are p^(1/T), renormalised", low=0.1,
                             low_why="p^(1/T) of a near-uniform prediction over many classes underflows float32")
    me_max: bool = setting(True, "mean-entropy maximisation of the average prediction")
    label_smoothing: float = setting(0.1, "label smoothing of the support labels", low=0.0, high=1.0, high_open=True)


@dataclass
class LossConfig:
    method: str = setting("simclr", "simclr (NT-Xent), swav or paws; loss.suncet_weight adds SuNCEt to simclr and "
                          "swav", choices=METHODS)
    temperature: float = setting(0.1, "temperature of NT-Xent, SuNCEt, SwAV's prediction and PAWS's soft nearest "
                                 "neighbours", low=0.001, low_why="the logits are cosines / temperature; fp16 holds "
                                                                  "at most 65504")
    suncet_weight: float = setting(1.0, "weight of SuNCEt's supervised term; 0: the objective alone", low=0.0)
    suncet_weight_rule: str = setting("paper_ratio", "paper_ratio: suncet_weight scaled so that a support anchor "
                                      "weighs against a view anchor as at the paper's shapes (x1 there); fixed: "
                                      "as given", choices=SUNCET_WEIGHT_RULES)
    supervised_epochs: int | None = setting(None, "SuNCEt is switched off from this epoch on; null: never", low=0)
    ntxent_gather: str = setting("grad", "NT-Xent rows that carry gradient: grad every row (SimCLR's formula); "
                                 "official only the anchors (the SuNCEt code); detached a rank's own rows",
                                 choices=GATHERS)
    on_nonfinite: str = setting("stop", "a non-finite loss or gradient: stop the run, or skip the step and count it",
                                choices=("stop", "skip"))
    max_skipped_in_a_row: int = setting(10, "with on_nonfinite=skip: this many non-finite steps in a row stop the "
                                        "run", low=1)
    max_skipped_share: float = setting(0.05, "with on_nonfinite=skip: a run that skipped a larger share of its "
                                       "steps ends with exit code 3 and says so in summary.json", low=0.0, high=1.0)
    swav: SwAVConfig = setting(doc="SwAV's settings (loss.method=swav)", factory=SwAVConfig)
    paws: PAWSConfig = setting(doc="PAWS's settings (loss.method=paws)", factory=PAWSConfig)
