"""The configuration: ``_base_`` resolution, every value checked when the config loads (finite,
in range, bounded where memory or time would run out), timm input sizes, the warm-up rule.

The expectations are written here by hand, key by key, not read from the limits the config
declares, so that a limit lost from a field fails a test.
"""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from train import pretrain
from train.config import ConfigError, PretrainConfig, load_config


def _refusal(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides).validate()
    return str(exc.value)


# --------------------------------------------------------------------------- _base_

@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working folder with a ``cfg/`` folder of its own, away from the repository."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    return tmp_path


@pytest.mark.parametrize("base", ["repro_imagenette.yaml", "repro_imagenette"])
def test_a_base_names_a_shipped_config_from_any_folder(elsewhere, base):
    (elsewhere / "cfg" / "mine.yaml").write_text(f"_base_: {base}\noptim:\n  epochs: 3\n")
    cfg = load_config("cfg/mine.yaml")
    shipped = load_config("repro_imagenette")
    assert cfg.optim.epochs == 3
    assert dataclasses.replace(cfg, optim=shipped.optim) == shipped


def test_a_base_beside_the_config_comes_before_a_shipped_one(elsewhere):
    (elsewhere / "cfg" / "repro_imagenette.yaml").write_text("optim:\n  epochs: 7\n")
    (elsewhere / "cfg" / "mine.yaml").write_text("_base_: repro_imagenette\nrun:\n  seed: 3\n")
    cfg = load_config("cfg/mine.yaml")
    assert (cfg.optim.epochs, cfg.run.seed, cfg.data.knn_max_samples) == (7, 3, PretrainConfig().data.knn_max_samples)


def test_a_missing_base_lists_the_shipped_configs_and_the_nearest(elsewhere, capsys):
    (elsewhere / "cfg" / "mine.yaml").write_text("_base_: repro_imagenete.yaml\n")
    assert pretrain.main(["--config", "cfg/mine.yaml", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "cfg/mine.yaml: _base_ 'repro_imagenete.yaml' not found: cfg/repro_imagenete.yaml" in err
    assert "(did you mean repro_imagenette?); shipped configs: demo, " in err and "small_folder" in err


# --------------------------------------------------------------------------- values

FLOAT = (float, tuple)


def _numeric_keys() -> list[tuple[str, typing.Any]]:
    """Every float setting (alone or in a list) of every section, by dotted key, with its default."""
    out = []

    def walk(obj, prefix):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif float in (hints[f.name], *typing.get_args(hints[f.name])) or (
                    isinstance(value, tuple) and value and isinstance(value[0], float)):
                out.append((prefix + f.name, value))

    walk(PretrainConfig(), "")
    return out


@pytest.mark.parametrize("key, default", _numeric_keys())
@pytest.mark.parametrize("bad", [".inf", "-.inf", ".nan"])
def test_every_float_refuses_a_value_that_is_not_finite_naming_the_key(key, default, bad):
    value = f"[{', '.join([bad] + ['0.5'] * (len(default) - 1))}]" if isinstance(default, tuple) else bad
    message = _refusal([f"{key}={value}"])
    assert message.startswith(f"{key} must be a finite number"), message


def test_the_sweep_covers_the_recipe_the_objectives_and_the_optimizer():
    keys = {k for k, _ in _numeric_keys()}
    assert {"augment.jitter_strength", "augment.std", "augment.mean", "loss.temperature", "loss.swav.epsilon",
            "loss.paws.sharpen", "optim.lr", "optim.momentum", "run.preempt_grace_s"} <= keys


@pytest.mark.parametrize("override, message", [
    # the cases
    ("augment.jitter_strength=.inf", "augment.jitter_strength must be a finite number, got inf"),
    ("augment.std=[.inf, 1, 1]", "augment.std must be a finite number in every entry, got [inf, 1.0, 1.0]"),
    ("augment.mean=[.nan, 0.4, 0.4]", "augment.mean must be a finite number in every entry"),
    # ranges of meaning
    ("augment.std=[0.2, 0, 0.2]", "augment.std must be >= 0.001"),
    ("augment.mean=[0.5, 2, 0.5]", "augment.mean must be in [0, 1] in every entry"),
    ("augment.jitter_strength=-0.5", "augment.jitter_strength must be >= 0"),
    ("augment.flip_prob=1.5", "augment.flip_prob must be in [0, 1]"),
    ("augment.crop_scale=[0.5, 0.2]", "augment.crop_scale must be in order (low <= high)"),
    ("augment.crop_scale=[0.2, 1.5]", "augment.crop_scale must be in (0, 1] in every entry"),
    ("augment.blur_sigma=[2, 1]", "augment.blur_sigma must be in order"),
    ("augment.solarize_threshold=[-0.1, 0.5]", "augment.solarize_threshold must be in [0, 1]"),
    ("augment.views=[{count: 2}, {count: 4, jitter_strength: .inf}]",
     "augment.views[1].jitter_strength must be a finite number"),
    ("optim.momentum=1", "optim.momentum must be in [0, 1)"),
    ("optim.trust_coefficient=0", "optim.trust_coefficient must be > 0"),
    ("optim.weight_decay=-1e-6", "optim.weight_decay must be >= 0"),
    ("loss.temperature=0", "loss.temperature must be >= 0.001"),
    ("loss.suncet_weight=-1", "loss.suncet_weight must be >= 0"),
    ("loss.swav.epsilon=0.005", "loss.swav.epsilon must be > 0.0113 (Sinkhorn takes exp(score / epsilon)"),
    ("loss.paws.sharpen=0.01", "loss.paws.sharpen must be >= 0.1"),
    ("run.preempt_grace_s=0", "run.preempt_grace_s must be > 0"),
    ("data.labeled_fraction=0", "data.labeled_fraction must be in (0, 1]"),
    ("data.unlabeled_batch_size=1", "data.unlabeled_batch_size must be >= 2 (NT-Xent needs negatives)"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("data.support_classes=-1", "data.support_classes must be >= 0"),
    ("model.sync_bn_group_size=-2", "model.sync_bn_group_size must be >= 0"),
    ("compute.max_host_lead_steps=-1", "compute.max_host_lead_steps must be >= 0"),
    ("run.precision=fp64", "run.precision must be one of ('auto', 'fp32', 'fp16', 'bf16'), got 'fp64'"),
    ("loss.ntxent_gather=all", "loss.ntxent_gather must be one of ('grad', 'detached', 'official')"),
    ("optim.name=sgd", "optim.name must be 'lars' or 'larc', got 'sgd'"),
])
def test_a_value_out_of_range_is_refused_naming_the_key(override, message):
    assert message in _refusal([override])


@pytest.mark.parametrize("override, message", [
    ("loss.swav.prototypes=100000000", "loss.swav.prototypes must be <= 65536 (the codes are"),
    ("loss.swav.sinkhorn_iterations=100000000", "loss.swav.sinkhorn_iterations must be <= 100 (each is"),
    ("loss.swav.queue_length=10000000", "loss.swav.queue_length must be <= 65536"),
    ("model.head_hidden_dim=1000000", "model.head_hidden_dim must be <= 16384 (a head layer's weights"),
    ("model.head_out_dim=1000000", "model.head_out_dim must be <= 16384"),
    ("model.pred_hidden_dim=1000000", "model.pred_hidden_dim must be <= 16384"),
    ("data.unlabeled_batch_size=1000000", "data.unlabeled_batch_size must be <= 8192"),
    ("data.support_images_per_class=100000", "data.support_images_per_class must be <= 1024"),
    ("data.support_views=1000", "data.support_views must be <= 64"),
    ("data.num_workers=100000", "data.num_workers must be <= 256"),
    ("data.knn_max_samples=100000000", "data.knn_max_samples must be <= 1000000"),
    ("augment.resolution=100000", "augment.resolution must be <= 2048 (a view's pixels grow"),
    ("augment.views=[{count: 2}, {count: 6, resolution: 100000}]", "augment.views[1].resolution must be <= 2048"),
    ("augment.views=[{count: 2}, {count: 100}]", "augment.views ask for 102 views per image; at most 64"),
    ("compute.max_host_lead_steps=1000", "compute.max_host_lead_steps must be <= 64"),
])
def test_sizes_that_would_exhaust_memory_or_time_are_refused_with_the_bound(override, message):
    assert message in _refusal([override])


def test_a_step_too_large_as_a_whole_is_refused_naming_its_parts():
    message = _refusal(["data.unlabeled_batch_size=4096", "augment.views=[{count: 2}, {count: 30, resolution: 96}]"])
    assert "a step would put 131112 images through the network on each rank (32 views x " \
           "data.unlabeled_batch_size=4096 + the support set's" in message and "at most 65536" in message


def test_the_bounds_let_every_shipped_config_through():
    from train.config import shipped_configs

    for name in shipped_configs():
        load_config(name).validate(world_size=64)


def test_print_config_checks_every_value(capsys):
    assert pretrain.main(["--set", "loss.swav.prototypes=100000000", "--print-config"]) == 2
    assert "loss.swav.prototypes must be <= 65536" in capsys.readouterr().err


# --------------------------------------------------------------------------- timm encoders

def test_a_timm_model_of_fixed_input_size_is_refused_unless_the_views_have_it():
    pytest.importorskip("timm")
    message = _refusal(["model.arch=timm/mixer_s16_224", "augment.resolution=32"])
    assert message == ("model.arch timm/mixer_s16_224 takes 224 x 224 px images only, but the views are 32 px "
                       "(augment.resolution, augment.views): set augment.resolution=224 (and no other view size), "
                       "or choose a model that takes any size (a CNN, or a ViT: timm/vit_*)")
    multicrop = ["model.arch=timm/mixer_s16_224", "augment.views=[{count: 2}, {count: 6, resolution: 96}]"]
    assert "the views are 96 and 224 px" in _refusal(multicrop)
    load_config(None, ["model.arch=timm/mixer_s16_224"]).validate()  # 224 px views: what it takes
    load_config(None, ["model.arch=timm/vit_tiny_patch16_224", "augment.resolution=32"]).validate()  # any size


def test_the_fixed_size_is_what_the_model_accepts():
    """The size read without building weights is the one the built model takes, and no other."""
    timm = pytest.importorskip("timm")
    import torch

    from model import input_geometry

    assert input_geometry("timm/mixer_s16_224").fixed_side == 224
    model = timm.create_model("mixer_s16_224", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
        with pytest.raises(Exception, match="224"):
            model(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("arch, side", [("resnet18-small", 16), ("resnet18", 32), ("timm/resnet10t", 32)])
def test_the_reduction_read_for_the_warning_is_the_models(arch, side):
    """A view of ``side`` px ends as a feature map of side ``side / reduction`` (>= 1), measured."""
    if arch.startswith("timm/"):
        pytest.importorskip("timm")
    import torch

    from model import build_encoder, input_geometry

    encoder, _ = build_encoder(arch)
    maps = []
    hook = (encoder.layer4 if hasattr(encoder, "layer4") else encoder.stages[-1]).register_forward_hook(
        lambda module, args, out: maps.append(out.shape[-1]))
    with torch.no_grad():
        encoder.eval()(torch.zeros(1, 3, side * 4, side * 4))
    hook.remove()
    assert maps == [side * 4 // input_geometry(arch).reduction]


def test_a_view_that_shrinks_to_one_pixel_is_warned_about(capsys):
    pytest.importorskip("timm")
    load_config(None, ["model.arch=timm/resnet10t", "augment.resolution=32"])
    err = capsys.readouterr().err
    assert err.startswith("warning: model.arch timm/resnet10t reduces images 32-fold: 32 px views end as a 1 x 1 "
                          "feature map") and "model.arch=resnet18-small" in err
    load_config(None, ["model.arch=timm/resnet10t", "augment.resolution=64"])
    load_config(None, ["model.arch=resnet18-small", "augment.resolution=16"])
    assert capsys.readouterr().err == ""


def test_print_config_refuses_a_timm_name_that_does_not_exist(capsys):
    pytest.importorskip("timm")
    assert pretrain.main(["--set", "model.arch=timm/resnet_that_is_not", "--print-config"]) == 2
    assert "timm has no model 'resnet_that_is_not'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the warm-up

def test_a_warm_up_as_long_as_the_run_says_what_to_set():
    message = _refusal(["optim.epochs=1", "optim.warmup_epochs=10"])
    assert message == ("optim.warmup_epochs=10 leaves no step of cosine decay in optim.epochs=1: set "
                       "optim.warmup_epochs below 1 (e.g. optim.warmup_epochs=0.1, a tenth of the run) or "
                       "optim.epochs to at least 11")
    for fix in (["optim.warmup_epochs=0.1"], ["optim.epochs=11"]):
        load_config(None, ["optim.epochs=1", "optim.warmup_epochs=10", *fix]).validate()
    assert math.isclose(load_config(None, ["optim.epochs=3", "optim.warmup_epochs=2.5"]).optim.warmup_epochs, 2.5)
