"""The training step's switches (``compute.*``) against the eager step.

The reference is the eager step: per-parameter LARS, a host sync every step,
no compilation. Each switch must give the same parameters, BatchNorm buffers
and LARS momentum after a few steps on resnet18-small in fp32; a non-finite
step must be skipped (or stop the run) the same way without a host sync."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers.host_syncs import host_syncs_forbidden
from tools.bench.measure import StepShape, synthetic_batch
from train.config import ConfigError, load_config
from train.distributed import DistContext
from train.precision import resolve_precision
from train.step import HostLead, NonFiniteLossError, StepRecords
from train.wiring import build_step_kit

CPU = DistContext(0, 1, 0, torch.device("cpu"))
SHAPE = StepShape(unlabeled=6, support_classes=3, support_per_class=2, support_views=1, groups=((2, 16),),
                  support_resolution=16)
LRS = [0.03, 0.08, 0.05]  # the schedule moves lr between steps


def _cfg(**compute):
    overrides = ["model.arch=resnet18-small", "model.head_hidden_dim=32", "model.head_out_dim=16",
                 "model.sync_bn=false", f"data.unlabeled_batch_size={SHAPE.unlabeled}",
                 f"data.support_classes={SHAPE.support_classes}",
                 f"data.support_images_per_class={SHAPE.support_per_class}", f"augment.resolution={SHAPE.resolution}",
                 "run.precision=fp32", "optim.weight_decay=0.0001", "optim.nesterov=true"]
    overrides += [f"compute.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in compute.items()]
    cfg = load_config(None, overrides)
    cfg.validate()
    return cfg


def _kit(cfg, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)  # the same initial weights for every variant
    kit = build_step_kit(cfg, CPU, resolve_precision(cfg.run.precision, CPU.device))
    kit.core.to(dtype)  # float64: the same parameter objects, so LARS' groups still hold them
    kit.model.train()
    return kit


def _batches(n: int, dtype: torch.dtype = torch.float32):
    torch.manual_seed(1)
    batches = [synthetic_batch(SHAPE, CPU.device, torch.float32, channels_last=True) for _ in range(n)]
    if dtype == torch.float32:
        return batches
    return [dataclasses.replace(b, views=tuple(x.to(dtype) for x in b.views),
                                support_images=b.support_images.to(dtype)) for b in batches]


def _train(kit, batches, poison_step: int | None = None) -> tuple[list[dict], int]:
    """Run the kit's step over ``batches`` as train_one_epoch does (read back
    every step or only at the end); NaN input images at ``poison_step``."""
    step, records, out = kit.step_for_epoch(0), StepRecords(kit.cfg.loss.on_nonfinite == "skip"), []
    skipped = 0
    for i, (batch, lr) in enumerate(zip(batches, LRS)):
        for group in kit.optimizer.param_groups:
            group["lr"] = lr
        if i == poison_step:
            batch = synthetic_batch(SHAPE, CPU.device, torch.float32, True)
            batch.view1[0, 0, 0, 0] = float("nan")
        records.add(step(dataclasses.replace(batch, step=i)))
        if step.syncs_every_step:
            out.append(records.check())
    if not step.syncs_every_step:
        out.append(records.check())
    skipped = sum(int(o["skipped"]) for o in out)
    return out, skipped


def _state(kit) -> dict[str, torch.Tensor]:
    state = {f"p.{k}": v.detach().clone() for k, v in kit.core.state_dict().items()}
    for i, p in enumerate(p for g in kit.optimizer.param_groups for p in g["params"]):
        state[f"v.{i}"] = kit.optimizer.state[p]["momentum_buffer"].clone()
    return state


def _assert_same_update(reference: dict, got: dict, rtol: float, atol: float) -> None:
    assert reference.keys() == got.keys()
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def eager_after_three_steps():
    kit = _kit(_cfg())
    _train(kit, _batches(3))
    return _state(kit)


@pytest.mark.parametrize("switches", [
    {"lars_foreach": True},
    {"host_sync": "log"},
    {"lars_foreach": True, "host_sync": "log"},
])
def test_switch_gives_the_eager_update(eager_after_three_steps, switches):
    kit = _kit(_cfg(**switches))
    _train(kit, _batches(3))
    # Same ops in another grouping: float32 rounding differences only.
    _assert_same_update(eager_after_three_steps, _state(kit), rtol=1e-5, atol=1e-6)


def test_the_eager_reference_is_sensitive_to_the_update():
    # Guard for the tolerance above: one step less, or another lr, is far outside it.
    reference = _kit(_cfg())
    _train(reference, _batches(3))
    other = _kit(_cfg())
    _train(other, _batches(2))
    with pytest.raises(AssertionError):
        _assert_same_update(_state(reference), _state(other), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_step_gives_the_eager_update_in_float64():
    """The compiled forward (inductor) against the eager step where rounding cannot hide a wrong update."""
    eager, compiled = _kit(_cfg(), torch.float64), _kit(_cfg(compile=True), torch.float64)
    _train(eager, _batches(3, torch.float64))
    _train(compiled, _batches(3, torch.float64))
    _assert_same_update(_state(eager), _state(compiled), rtol=1e-7, atol=1e-10)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_all_switches_in_float32_stay_as_close_to_exact_as_the_eager_step(eager_after_three_steps):
    """compile + foreach + no host sync, in float32 and channels-last as trained.

    On this CPU the eager float32 step is itself inexact: its channels-last
    convolution/BatchNorm backward differs from float64 by up to ~2% of a
    gradient, and three steps on random images amplify that to tens of percent
    of the update in some tensors (BatchNorm parameters take plain SGD steps).
    Inductor's kernels land closer to float64. So the float32 check is: the
    optimised step's distance to the exact (float64 eager) update is at most
    1.5 times the eager float32 step's, per tensor; the float64 test above
    checks the maths tightly."""
    exact = _kit(_cfg(), torch.float64)
    _train(exact, _batches(3, torch.float64))
    fast = _kit(_cfg(compile=True, lars_foreach=True, host_sync="log"))
    _train(fast, _batches(3))
    exact_state, fast_state = _state(exact), _state(fast)
    for key, want in exact_state.items():
        want = want.double()
        eager_err = (eager_after_three_steps[key].double() - want).norm()
        fast_err = (fast_state[key].double() - want).norm()
        # 1e-6: tensors whose exact value is rounding noise (biases in front of BatchNorm have zero gradient)
        assert fast_err <= 1.5 * eager_err + 1e-6, (key, fast_err.item(), eager_err.item())


@pytest.mark.parametrize("grad_scaler", [False, True])
def test_unsynced_step_reads_nothing_back(grad_scaler):
    kit = _kit(_cfg(lars_foreach=True, host_sync="log"))
    if grad_scaler:  # the fp16 path's scaler, on CPU with fp32 (the loss is scaled, the maths are the same)
        kit.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        kit._steps.clear()
    step, (batch,) = kit.step_for_epoch(0), _batches(1)
    step(batch)  # first step: momentum buffers are created
    with host_syncs_forbidden():
        results = [step(batch) for _ in range(2)]
    records = StepRecords(skip_nonfinite=False)
    for r in results:
        records.add(r)
    out = records.check()
    assert out["skipped"] == 0 and set(out) == {"loss_ntxent", "loss_suncet", "loss", "skipped", "steps"}


def test_the_sync_guard_catches_the_eager_step():
    kit = _kit(_cfg())
    step, (batch,) = kit.step_for_epoch(0), _batches(1)
    with host_syncs_forbidden(), pytest.raises(AssertionError, match="host sync: Tensor.item"):
        step(batch)


@pytest.mark.parametrize("switches", [{}, {"host_sync": "log"}, {"host_sync": "log", "lars_foreach": True}])
def test_nonfinite_step_is_skipped_exactly(switches):
    """A NaN in the inputs of step 1 of 3: that update is skipped (parameters,
    BN buffers and momentum as after step 0... then step 2 applies), the
    skip is counted, and the result equals a run without step 1."""
    cfg = _cfg(**switches)
    cfg.loss.on_nonfinite = "skip"
    batches = _batches(3)
    kit = _kit(cfg)
    _, skipped = _train(kit, batches, poison_step=1)
    assert skipped == 1
    # Reference: the eager step on steps 0 and 2 only (lr of step 2), BN statistics of the poisoned forward aside.
    reference = _kit(_cfg())
    step = reference.step_for_epoch(0)
    for batch, lr in ((batches[0], LRS[0]), (batches[2], LRS[2])):
        for group in reference.optimizer.param_groups:
            group["lr"] = lr
        StepRecords(False).add(step(batch)).check()
    got, want = _state(kit), _state(reference)
    for key in want:
        if "running_" in key or "num_batches_tracked" in key:
            continue  # the poisoned forward still updated BN statistics (with NaN), in both implementations
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("host_sync", ["step", "log"])
def test_nonfinite_step_stops_naming_step_and_losses(host_sync):
    kit = _kit(_cfg(host_sync=host_sync))
    # NaN in one input pixel: BatchNorm spreads it to every embedding of the step.
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 0 step 1: loss_ntxent=nan, "
                                                 r"loss_suncet=nan, loss=nan"):
        _train(kit, _batches(3), poison_step=1)


def test_records_average_the_finite_steps_and_count_skips():
    rec = StepRecords(skip_nonfinite=True)
    from train.step import StepResult

    names = ("loss_ntxent", "loss")
    for step, row in enumerate([[1.0, 1.5, 0, 0], [float("nan"), float("nan"), 1, 0], [2.0, 2.5, 0, 0]]):
        rec.add(StepResult(torch.tensor(row), names, epoch=3, step=step))
    assert rec.check() == {"loss_ntxent": 1.5, "loss": 2.0, "skipped": 1.0, "steps": 2.0}  # the NaN step left out
    assert rec.check() == {"skipped": 0.0} and rec.pending == []
    strict = StepRecords(skip_nonfinite=False)
    strict.add(StepResult(torch.tensor([1.0, 1.0, 0, 0]), names, 3, 7))
    strict.add(StepResult(torch.tensor([1.0, float("inf"), 0, 1]), names, 3, 8))
    with pytest.raises(NonFiniteLossError, match="non-finite gradients at epoch 3 step 8: loss_ntxent=1, loss=inf"):
        strict.check()


def test_loss_closures_and_steps_are_built_once_per_phase(monkeypatch):
    import train.objectives.simclr as step_module

    built = []
    real = step_module.init_nt_xent_loss
    monkeypatch.setattr(step_module, "init_nt_xent_loss", lambda *a, **k: built.append(a) or real(*a, **k))
    cfg = _cfg()
    cfg.loss.supervised_epochs = 2
    kit = _kit(cfg)
    first = kit.step_for_epoch(0)
    for batch in _batches(2):
        first(batch)
    assert kit.step_for_epoch(1) is first and first.use_support
    late = kit.step_for_epoch(2)
    assert late is not first and not late.use_support and kit.step_for_epoch(7) is late
    assert len(built) == 2  # one NT-Xent closure per phase, none per step


def test_cuda_graphs_are_refused_on_cpu_naming_the_key():
    with pytest.raises(ConfigError, match="compute.cuda_graphs needs a CUDA device"):
        _kit(_cfg(compile=True, cuda_graphs=True))
    with pytest.raises(ConfigError, match="compute.cuda_graphs needs compute.compile=true"):
        _cfg(cuda_graphs=True)


class _FakeEvent:
    log: list = []

    def __init__(self):  # one event per step, recorded in order: its id is the step
        self.id = sum(1 for what, _ in _FakeEvent.log if what == "record")
        _FakeEvent.log.append(("record", self.id))

    def record(self):
        pass

    def synchronize(self):
        _FakeEvent.log.append(("wait", self.id))


@pytest.mark.parametrize("lead", [0, 2])
def test_host_lead_waits_for_the_step_lead_plus_one_back(monkeypatch, lead):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    _FakeEvent.log = []
    bound = HostLead(lead, torch.device("cuda"))
    for step in range(5):
        bound.wait()  # before taking batch `step`
        _FakeEvent.log.append(("batch", step))
        bound.record()
    waited_before = {}
    for i, (what, n) in enumerate(_FakeEvent.log):
        if what == "batch":
            waited_before[n] = [m for w, m in _FakeEvent.log[:i] if w == "wait"]
    for step in range(5):  # before batch s, steps up to s - lead - 1 have finished on the device
        assert waited_before[step] == list(range(max(0, step - lead)))
    assert HostLead(3, torch.device("cpu")).enabled is False


# --------------------------------------------------------------------------- CUDA (skipped on CPU machines)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_cuda_unsynced_step_never_waits_for_the_device(precision):
    """torch.cuda.set_sync_debug_mode('error') around steps 2-3 of the
    host_sync=log step (foreach LARS; fp16 with GradScaler): nothing in the
    step may block on the device."""
    cfg = _cfg(lars_foreach=True, host_sync="log")
    cfg.run.precision = precision
    ctx = DistContext(0, 1, 0, torch.device("cuda"))
    prec = resolve_precision(precision, ctx.device)
    torch.manual_seed(0)
    kit = build_step_kit(cfg, ctx, prec)
    kit.model.train()
    batch = synthetic_batch(SHAPE, ctx.device, prec.input_dtype, channels_last=True)
    step, records = kit.step_for_epoch(0), StepRecords(skip_nonfinite=True)
    records.add(step(batch))  # first step: buffers, cuDNN autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            records.add(step(batch))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    out = records.check()
    assert all(torch.isfinite(torch.tensor(v)) for k, v in out.items() if k != "skipped")


@CUDA
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cuda_graphs_step_stays_as_close_to_exact_as_the_eager_step():
    """compile + CUDA graphs + foreach + no host sync on CUDA in float32,
    against the eager float32 and float64 steps on the same device (as the
    CPU test of all switches)."""
    ctx = DistContext(0, 1, 0, torch.device("cuda"))

    def run(dtype, **switches):
        cfg = _cfg(**switches)
        torch.manual_seed(0)
        kit = build_step_kit(cfg, ctx, resolve_precision("fp32", ctx.device))
        kit.core.to(dtype)
        kit.model.train()
        step = kit.step_for_epoch(0)
        records = StepRecords(skip_nonfinite=False)
        for i, (batch, lr) in enumerate(zip(_batches(3, dtype), LRS)):
            for group in kit.optimizer.param_groups:
                group["lr"] = lr
            batch = dataclasses.replace(batch, views=tuple(x.cuda() for x in batch.views),
                                        support_images=batch.support_images.cuda(),
                                        support_labels=batch.support_labels.cuda(), step=i)
            records.add(step(batch))
        records.check()
        return {k: v.cpu() for k, v in _state(kit).items()}

    exact, eager = run(torch.float64), run(torch.float32)
    fast = run(torch.float32, compile=True, cuda_graphs=True, lars_foreach=True, host_sync="log")
    for key, want in exact.items():
        want = want.double()
        eager_err, fast_err = (eager[key].double() - want).norm(), (fast[key].double() - want).norm()
        assert fast_err <= 1.5 * eager_err + 1e-6, (key, fast_err.item(), eager_err.item())


@pytest.mark.parametrize("benchmark, deterministic, expected", [(True, False, True), (False, False, False),
                                                                (True, True, False)])
def test_cudnn_autotuning_follows_the_config(monkeypatch, benchmark, deterministic, expected):
    from train.wiring import configure_backends

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not expected)  # restored after the test
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)  # process-wide: not here
    cfg = _cfg(cudnn_benchmark=benchmark)
    cfg.run.deterministic = deterministic
    configure_backends(cfg, torch.device("cuda"))  # only sets flags: runs without a GPU
    assert torch.backends.cudnn.benchmark is expected


def test_paper_ratio_weights_a_support_anchor_as_at_the_papers_shapes():
    from train.config import load_config
    from train.config import effective_suncet_weight
    paper = load_config(None, ["loss.suncet_weight_rule=paper_ratio"])  # 44 x 2 views, 20 x 2 support
    assert effective_suncet_weight(paper) == pytest.approx(1.0)
    small = load_config(None, ["loss.suncet_weight_rule=paper_ratio", "data.unlabeled_batch_size=64",
                               "data.support_classes=10", "data.support_images_per_class=2", "loss.suncet_weight=0.5"])
    # one support anchor weighs w * 2B / S view anchors: kept at the paper's 88 / 40
    w = effective_suncet_weight(small)
    assert w * 128 / 20 == pytest.approx(0.5 * 88 / 40)
    assert effective_suncet_weight(load_config(None, ["loss.suncet_weight_rule=fixed", "data.unlabeled_batch_size=64",
                                                      "loss.suncet_weight=0.5"])) == 0.5
    # the default rule is paper_ratio (chosen on held-out train images, RESULTS.md)
    assert effective_suncet_weight(load_config(None, ["data.unlabeled_batch_size=64", "data.support_classes=10",
                                                      "data.support_images_per_class=2"])) == pytest.approx(w / 0.5)


def test_each_resolution_is_one_forward_and_the_loss_sees_every_view():
    """Multi-crop: the encoder runs once on the 2 x 16 px views with the support set and once on
    the 3 x 8 px views (SwAV's grouping), the head once on every feature in the contract's order;
    NT-Xent pairs all five views of each image, SuNCEt the support rows."""
    from train.config import effective_suncet_weight
    from train.losses import nt_xent, suncet

    cfg = load_config(None, [f"{k}={v}" for k, v in {"model.arch": "resnet18-small", "model.head_hidden_dim": 32,
                                                      "model.head_out_dim": 16, "model.sync_bn": "false",
                                                      "data.unlabeled_batch_size": 6, "data.support_classes": 3,
                                                      "data.support_images_per_class": 2, "run.precision": "fp32"}.items()]
                      + ["augment.views=[{count: 2, resolution: 16}, {count: 3, resolution: 8}]"])
    kit = _kit(cfg)
    shape = dataclasses.replace(SHAPE, groups=((2, 16), (3, 8)))
    batch = synthetic_batch(shape, CPU.device, torch.float32, channels_last=True)
    seen = []
    hooks = [module.register_forward_pre_hook(lambda module, args, name=name: seen.append((name, tuple(args[0].shape))))
             for name, module in (("encoder", kit.core.encoder), ("head", kit.core.head))]
    step = kit.step_for_epoch(0)
    with torch.no_grad():
        losses = step._forward(batch.views, batch.support_images, batch.support_labels)
        for hook in hooks:
            hook.remove()
        assert seen == [("encoder", (2 * 6 + 6, 3, 16, 16)), ("encoder", (3 * 6, 3, 8, 8)),
                        ("head", (5 * 6 + 6, kit.core.feature_dim))]
        big = kit.core.encoder(torch.cat([batch.views[0], batch.support_images]))
        small = kit.core.encoder(batch.views[1])
        z = kit.core.head(torch.cat([big[:12], small, big[12:]]))
    t = cfg.loss.temperature
    expected_nt = nt_xent(z[:30], t, views=5)
    expected_sc = suncet(z[30:], batch.support_labels, t)
    torch.testing.assert_close(losses[0], expected_nt)
    torch.testing.assert_close(losses[1], expected_sc)
    torch.testing.assert_close(losses[2], expected_nt + effective_suncet_weight(cfg) * expected_sc)
