from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet50

from model import build_model, export_torchvision_state_dict


@pytest.mark.parametrize(
    "arch,res,feat",
    [("resnet50", 64, 2048), ("resnet18", 64, 512), ("resnet18-small", 32, 256), ("resnet18-small", 16, 256)],
)
def test_output_shapes(arch, res, feat):
    torch.manual_seed(0)
    model = build_model(arch, head_hidden_dim=64, head_out_dim=16)
    x = torch.randn(2, 3, res, res).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert model.feature_dim == feat
        assert model.features(x).shape == (2, feat)
        assert model(x).shape == (2, 16)


def test_head_layout():
    head = build_model("resnet18-small", head_hidden_dim=32, head_out_dim=8).head
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head.fc1.in_features, head.fc1.out_features, head.fc3.out_features) == (256, 32, 8)


def test_channels_last_preserved():
    model = build_model("resnet18-small", head_hidden_dim=32, head_out_dim=8, channels_last=True)
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    seen = {}
    model.encoder.conv1.register_forward_hook(lambda mod, inp, out: seen.setdefault("out", out))
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
    assert seen["out"].is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = build_model("resnet18-small", head_hidden_dim=32, head_out_dim=8)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(x)
    assert z.dtype == torch.bfloat16
    z.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_export_loads_into_torchvision_resnet50():
    torch.manual_seed(0)
    model = build_model("resnet50", head_hidden_dim=32, head_out_dim=8, channels_last=True)
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.encoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = export_torchvision_state_dict(model)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in sd.values())
    assert not any(k.startswith("fc.") for k in sd)
    tv = resnet50(weights=None)
    assert set(tv.state_dict()) - set(sd) == {"fc.weight", "fc.bias"}
    result = tv.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    tv.fc = nn.Identity()
    tv.eval()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), model.features(x.to(memory_format=torch.channels_last)), rtol=1e-4, atol=1e-4)


def test_export_unwraps_ddp_like_and_rejects_small():
    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # skip process-group setup
            nn.Module.__init__(self)
            self.module = module

    model = build_model("resnet18", head_hidden_dim=16, head_out_dim=8)
    sd = export_torchvision_state_dict(FakeDDP(model))
    assert set(sd) == {k for k in model.encoder.state_dict() if not k.startswith("fc.")}
    with pytest.raises(ValueError, match="not a torchvision model"):
        export_torchvision_state_dict(build_model("resnet18-small", head_hidden_dim=16, head_out_dim=8))


def test_sync_bn_conversion():
    plain = build_model("resnet18-small", head_hidden_dim=16, head_out_dim=8)
    synced = build_model("resnet18-small", head_hidden_dim=16, head_out_dim=8, sync_bn=True)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert n_bn > 0
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in synced.modules())


def test_unknown_arch():
    with pytest.raises(ValueError, match=r"model.arch must be one of resnet50, resnet18, resnet18-small or "
                                         r"timm/<name>, got 'vit'"):
        build_model("vit")


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("per_resolution", [True, False])
def test_head_batchnorm_groups_follow_the_objective(per_resolution):
    """PAWS (``head_per_resolution``): encoder *and* head per resolution group, so each group's
    head BatchNorm statistics are its own (the suncet repository's ``src/resnet.py``); SimCLR and
    SwAV: the encoder per resolution, the head once on every row. Checked against a reference
    that runs the groups by hand on a copy of the model: outputs and every running statistic."""
    from model.head import PAWSHead

    torch.manual_seed(0)
    model = build_model("resnet18-small", channels_last=False, head=lambda f: PAWSHead(f, 32, 16),
                        head_per_resolution=per_resolution).double().train()
    reference = __import__("copy").deepcopy(model)
    g0, g1, support = (torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(3))
    locals_ = [torch.randn(4, 3, 16, 16, dtype=torch.float64) for _ in range(3)]
    h, p = model([g0, g1, *locals_, support])  # the training step's order: views, then support
    with torch.no_grad():
        big = reference.encoder(torch.cat([g0, g1, support]))
        small = reference.encoder(torch.cat(locals_))
        if per_resolution:
            (hb, pb), (hs, ps) = reference.head(big), reference.head(small)
        else:  # one head call over every feature, in the input's order
            feats = torch.cat([big[:8], small, big[8:]])
            hb_all, pb_all = reference.head(feats)
            hb, pb = torch.cat([hb_all[:8], hb_all[20:]]), torch.cat([pb_all[:8], pb_all[20:]])
            hs, ps = hb_all[8:20], pb_all[8:20]
    expected_h = torch.cat([hb[:8], hs, hb[8:]])
    expected_p = torch.cat([pb[:8], ps, pb[8:]])
    torch.testing.assert_close(h.detach(), expected_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.detach(), expected_p, rtol=1e-10, atol=1e-10)
    got, want = _bn_state(model), _bn_state(reference)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10, msg=key)


def test_paws_head_per_resolution_differs_from_one_head_call():
    """The two forwards are not the same network function (the test above could not tell them
    apart otherwise): the head's BatchNorm sees other batches."""
    from model.head import PAWSHead

    torch.manual_seed(0)
    a = build_model("resnet18-small", channels_last=False, head=lambda f: PAWSHead(f, 32, 16),
                    head_per_resolution=True).train()
    b = __import__("copy").deepcopy(a)
    b.head_per_resolution = False
    x = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    assert (a(x)[1] - b(x)[1]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["timm/efficientnet_b0", "resnet18-small"])
def test_sync_bn_keeps_the_network_function(arch):
    """SyncBN changes how batch statistics are computed, never the network: eval features equal
    with and without it (timm's BatchNormAct2d keeps its activation under the conversion)."""
    if arch.startswith("timm/"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    plain = build_model(arch, head_hidden_dim=16, head_out_dim=8, channels_last=False).eval()
    synced = build_model(arch, head_hidden_dim=16, head_out_dim=8, channels_last=False, sync_bn=True).eval()
    synced.load_state_dict(plain.state_dict())
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in synced.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(synced.features(x), plain.features(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(synced(x), plain(x), rtol=1e-5, atol=1e-6)


def _sync_bn_group_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    from train.distributed import sync_bn_process_group

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4, timeout=datetime.timedelta(seconds=60))
    try:
        group = sync_bn_process_group(2)
        model = build_model("resnet18-small", head_hidden_dim=8, head_out_dim=4, sync_bn=True, sync_bn_group=group)
        layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
        total = torch.tensor([float(rank)])
        dist.all_reduce(total, group=layers[0].process_group)  # what a layer's statistics are summed over
        torch.save({"ranks": dist.get_process_group_ranks(group), "layers": len(layers),
                    "same_group": all(m.process_group is group for m in layers), "sum": total.item(),
                    "everyone": sync_bn_process_group(0) is None and sync_bn_process_group(4) is None},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sync_bn_groups_of_two_on_four_processes(tmp_path):
    """``model.sync_bn_group_size=2`` on 4 ranks: every SyncBN layer reduces over {0, 1} or {2, 3}
    (SwAV's ``syncbn_process_group_size``); 0, or a size >= the world, means every rank."""
    import torch.multiprocessing as mp

    from tests.helpers.dist import free_port

    mp.spawn(_sync_bn_group_worker, args=(free_port(), str(tmp_path)), nprocs=4, join=True)
    for rank in range(4):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        mates = [0, 1] if rank < 2 else [2, 3]
        assert got["ranks"] == mates and got["same_group"] and got["layers"] > 0 and got["everyone"]
        assert got["sum"] == sum(mates)


def test_sync_bn_group_size_must_divide_the_world():
    from train.config import ConfigError, PretrainConfig

    cfg = PretrainConfig()
    cfg.model.sync_bn_group_size = 8
    cfg.validate(world_size=4)  # larger than the world: every rank
    cfg.validate(world_size=16)
    with pytest.raises(ConfigError, match="sync_bn_group_size=8 does not divide the world size 12"):
        cfg.validate(world_size=12)
