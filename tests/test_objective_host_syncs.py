"""No objective makes the host wait for the device. Every shipped ImageNet config (SimCLR, SimCLR +
SuNCEt, multi-crop, SwAV, SwAV + SuNCEt, PAWS) is shrunk to resnet18-small, 4 images and 16 / 8 px
views, keeping its objective's settings, view counts and optimizer, and trains a few steps with
``compute.host_sync=log`` inside ``host_syncs_forbidden`` (on a GPU: under
``torch.cuda.set_sync_debug_mode('error')``). SwAV's queue fills and is read during those steps,
and its prototypes unfreeze."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers.host_syncs import host_syncs_forbidden
from tools.bench.measure import step_shape, synthetic_batch
from train.config import load_config
from train.distributed import DistContext
from train.precision import resolve_precision
from train.step import StepRecords
from train.wiring import build_step_kit

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = {"imagenet_10pct_suncet": "simclr", "imagenet_simclr": "simclr", "imagenet_multicrop": "simclr",
           "imagenet_10pct_swav": "swav", "imagenet_10pct_swav_suncet": "swav", "imagenet_10pct_paws": "paws"}
BATCH, STEPS = 4, 3
QUEUE = BATCH  # SwAV's queue: full after the first step, read by the next two


def _shrunk(name: str, **compute):
    """``name``'s config at a tiny model and batch; the objective's settings as shipped."""
    shipped = load_config(CONFIGS / f"{name}.yaml")
    sides = (16, 8)
    views = ", ".join(f"{{count: {g.count}, resolution: {sides[min(i, 1)]}}}"
                      for i, g in enumerate(shipped.augment.view_groups()))
    overrides = {"model.arch": "resnet18-small", "model.head_hidden_dim": 32, "model.head_out_dim": 16,
                 "model.sync_bn": "false", "data.unlabeled_batch_size": BATCH, "data.support_classes": 3,
                 "data.support_images_per_class": 2, "augment.resolution": 16, "augment.views": f"[{views}]",
                 "compute.host_sync": "log", **{f"compute.{k}": v for k, v in compute.items()}}
    if shipped.loss.method == "swav":
        overrides |= {"loss.swav.queue_length": QUEUE, "loss.swav.queue_start_epoch": 0}
    cfg = load_config(CONFIGS / f"{name}.yaml", [f"{k}={v}" for k, v in overrides.items()])
    cfg.validate()
    return cfg


def _train_unsynced(cfg, device: torch.device, guard) -> tuple[dict, object]:
    """``STEPS`` steps of one synthetic batch inside ``guard``; SwAV's cross its prototypes' unfreezing."""
    ctx = DistContext(0, 1, 0, device)
    torch.manual_seed(0)
    kit = build_step_kit(cfg, ctx, resolve_precision(cfg.run.precision, device))
    kit.model.train()
    step = kit.step_for_epoch(0)
    batch = synthetic_batch(step_shape(cfg), device, kit.precision.input_dtype, channels_last=True)
    first = cfg.loss.swav.freeze_prototypes_steps - 1 if cfg.loss.method == "swav" else 0
    records = StepRecords(skip_nonfinite=False)
    with guard():
        for global_step in range(first, first + STEPS):
            records.add(step(batch, global_step))
    out = records.check()
    assert out["skipped"] == 0 and set(out) == {*step.names, "skipped", "steps"}
    assert all(math.isfinite(v) for v in out.values()), out
    if cfg.loss.method == "swav":  # the steps read the full queue and updated the unfrozen prototypes
        assert step.objective.use_queue and step.objective.queued == QUEUE
        assert "momentum_buffer" in kit.optimizer.state[kit.core.head.prototypes.weight]
    return out, kit


WAITING = {  # what a GPU step must not do (each one blocks the host), and the guard refuses
    "a Python list as an index": lambda x: x[[0, 2]],
    "a tensor from a Python list": lambda x: torch.tensor([0, 2]),
    "torch.unique": lambda x: torch.unique(x),
    "a boolean-mask assignment": lambda x: x.__setitem__(x < 0, 0.0),
    "a boolean-mask read": lambda x: x[x > 0],
    "bool of a tensor": lambda x: bool(x.any()),
    "nonzero": lambda x: x.nonzero(),
    ".item()": lambda x: x.sum().item(),
}


@pytest.mark.parametrize("construct", sorted(WAITING))
def test_the_guard_refuses_what_waits_for_the_device(construct):
    x = torch.randn(5, 3)
    with host_syncs_forbidden(), pytest.raises(AssertionError, match="host sync"):
        WAITING[construct](x)


def test_the_guard_lets_the_forms_that_do_not_wait_through():
    x, index = torch.randn(5, 3), torch.arange(2)
    with host_syncs_forbidden():
        x.index_select(0, index), x.masked_fill(x < 0, 0.0), x[:, 0].sort(stable=True), x[1:3]
        x[index, index] = 1.0  # a Python number as the value: a 0-d scalar argument on a GPU too


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_no_objective_waits_for_the_device(name):
    cfg = _shrunk(name)
    assert cfg.loss.method == SHIPPED[name]
    _train_unsynced(cfg, torch.device("cpu"), host_syncs_forbidden)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_cuda_objective_step_never_waits_for_the_device(name):
    """As trained on a GPU (fp16 with a GradScaler, multi-tensor LARS/LARC)."""
    import contextlib

    @contextlib.contextmanager
    def sync_errors():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    _train_unsynced(_shrunk(name, lars_foreach="true"), torch.device("cuda"), sync_errors)
