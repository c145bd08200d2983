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
