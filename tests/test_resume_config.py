"""A resumed run names every setting that changed, in every section, with the checkpoint's value
and the new one; refuses in one line what the checkpoint's tensors cannot follow; and records
which settings each stretch of steps trained with (the checkpoint's ``config_history``)."""
from __future__ import annotations

import pytest

from train.config import ConfigError, config_to_dict, load_config
from train.resume import config_history, global_batch, resumed_config


def _checkpoint_of(cfg, world: int = 1) -> dict:
    return {"config": config_to_dict(cfg), "world_size": world, "global_batch": global_batch(cfg, world)}


def _resume(saved: list[str], now: list[str], capsys) -> tuple[str, str]:
    """(warning lines, note lines) of resuming a checkpoint of ``saved`` with ``now``."""
    checkpoint, cfg = _checkpoint_of(load_config(None, saved)), load_config(None, now)
    capsys.readouterr()  # what loading said
    resumed_config(checkpoint, cfg, 1)
    lines = capsys.readouterr().err.splitlines()
    return ("\n".join(l for l in lines if l.startswith("warning:")),
            "\n".join(l for l in lines if l.startswith("note:")))


def test_changed_augment_and_loss_settings_are_named_with_both_values(capsys):
    warned, _ = _resume(["augment.resolution=32"], ["augment.resolution=64", "loss.temperature=0.2",
                                                     "augment.jitter_strength=0.5"], capsys)
    assert warned.count("\n") == 0
    for change in ("augment.resolution: 32 -> 64", "loss.temperature: 0.1 -> 0.2", "augment.jitter_strength: 1.0 -> 0.5"):
        assert change in warned, warned


def test_changed_view_groups_are_named_group_by_group(capsys):
    before = "augment.views=[{count: 2}, {count: 4, resolution: 96}]"
    after = "augment.views=[{count: 2}, {count: 6, resolution: 96}, {count: 2, resolution: 64}]"
    warned, _ = _resume([before], [after], capsys)
    assert "augment.views[1].count: 4 -> 6" in warned
    assert "augment.views[2].count: absent -> 2" in warned and "augment.views[2].resolution: absent -> 64" in warned
    assert "augment.views[0]" not in warned and "augment.views[1].resolution" not in warned


def test_every_section_is_compared(capsys):
    warned, noted = _resume([], ["run.seed=5", "data.support_views=2", "model.sync_bn=false",
                                 "loss.paws.sharpen=0.5", "compute.lars_foreach=true", "run.log_every_steps=3"],
                            capsys)
    for change in ("run.seed: 0 -> 5", "data.support_views: 1 -> 2", "model.sync_bn: True -> False",
                   "loss.paws.sharpen: 0.25 -> 0.5"):
        assert change in warned, warned
    assert "compute.lars_foreach: False -> True" in noted and "run.log_every_steps: 10 -> 3" in noted
    assert "compute." not in warned and "run.log_every_steps" not in warned


def test_nothing_changed_nothing_said(capsys):
    assert _resume(["augment.resolution=48"], ["augment.resolution=48"], capsys) == ("", "")


@pytest.mark.parametrize("saved, now, named", [
    (["loss.method=swav", "loss.suncet_weight=0"], ["loss.method=swav", "loss.suncet_weight=0",
                                                    "loss.swav.prototypes=100"],
     "loss.swav.prototypes: 3000 -> 100"),
    ([], ["model.head_out_dim=64"], "model.head_out_dim: 128 -> 64"),
    ([], ["model.head_hidden_dim=512"], "model.head_hidden_dim: 2048 -> 512"),
    ([], ["model.pred_hidden_dim=16"], "model.pred_hidden_dim: None -> 16"),
    ([], ["model.arch=resnet18"], "model.arch: 'resnet50' -> 'resnet18'"),
    ([], ["optim.name=larc"], "optim.name: 'lars' -> 'larc'"),
])
def test_what_the_checkpoint_cannot_load_is_refused_in_one_line(saved, now, named):
    with pytest.raises(ConfigError) as exc:
        resumed_config(_checkpoint_of(load_config(None, saved)), load_config(None, now), 1)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("cannot resume: the checkpoint's weights or optimizer state")
    assert named in message and "start another run.output_dir" in message


def test_swav_prototypes_that_no_head_holds_are_only_named(capsys):
    """SimCLR builds no prototypes: a changed loss.swav.prototypes loads, and is said."""
    warned, _ = _resume([], ["loss.swav.prototypes=100"], capsys)
    assert "loss.swav.prototypes: 3000 -> 100" in warned


def test_a_prototype_count_the_checkpoint_cannot_load_is_the_one_refused():
    """The refusal matches what loading would do: the saved head's state does not load into the new one."""
    from model import build_model
    from train.objectives import head_factory

    swav = ["loss.method=swav", "loss.suncet_weight=0", "model.arch=resnet18-small", "model.head_hidden_dim=32",
            "model.head_out_dim=16"]
    saved, now = load_config(None, [*swav, "loss.swav.prototypes=30"]), load_config(None, [*swav,
                                                                                      "loss.swav.prototypes=20"])
    state = build_model(saved.model.arch, channels_last=False, sync_bn=False, head=head_factory(saved)).state_dict()
    model = build_model(now.model.arch, channels_last=False, sync_bn=False, head=head_factory(now))
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(state)
    with pytest.raises(ConfigError, match="loss.swav.prototypes: 30 -> 20"):
        resumed_config(_checkpoint_of(saved), now, 1)


def test_the_history_records_each_stretch_the_export_reads():
    from train.encoder_info import stretches_of

    first = load_config(None, ["augment.resolution=32"])
    history = config_history(None, first, 0)
    saved = {**_checkpoint_of(first), "config_history": history}
    same = config_history(saved, load_config(None, ["augment.resolution=32", "run.log_every_steps=5"]), 40)
    assert stretches_of(same) == ((0, 32),)
    larger = load_config(None, ["augment.resolution=64"])
    history = config_history(saved, larger, 40)
    assert stretches_of(history) == ((0, 32), (40, 64))
    back = config_history({**_checkpoint_of(larger), "config_history": history}, first, 90)
    assert stretches_of(back) == ((0, 32), (40, 64), (90, 32))


def test_a_checkpoint_without_a_history_starts_it_with_its_own_config():
    from train.encoder_info import stretches_of

    old = _checkpoint_of(load_config(None, ["augment.resolution=48"]))
    assert stretches_of(config_history(old, load_config(None, ["augment.resolution=96"]), 12)) == ((0, 48), (12, 96))
