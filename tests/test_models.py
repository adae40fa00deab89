"""Tests for cilkit.models: backbone shapes, sizes, last_relu, growable heads, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cilkit.common.errors import UserError
from cilkit.models import (
    BACKBONE_DESCRIPTIONS,
    BACKBONES,
    IncrementalLinear,
    IncrementalNet,
    build_backbone,
    build_model,
)
from cilkit.models.backbones import resnet32


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "channels", "size", "dim"),
    [
        ("resnet32", 3, 32, 64),
        ("resnet18", 3, 64, 512),
        ("resnet18_cifar", 3, 32, 512),
        ("convnet", 1, 8, 64),
        ("convnet", 3, 8, 64),
        ("convnet", 1, 28, 64),
        ("convnet", 3, 28, 64),
    ],
)
def test_backbone_output_shape(name: str, channels: int, size: int, dim: int) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, in_channels=channels, image_size=size)
    out = net(torch.randn(2, channels, size, size))
    assert net.out_dim == dim
    assert out.shape == (2, dim)


def test_convnet_width_sets_out_dim() -> None:
    net = build_backbone("convnet", in_channels=1, image_size=28, width=8)
    assert net.out_dim == 16
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 16)


def test_resnet32_parameter_counts() -> None:
    conv = _n_params(resnet32(in_channels=3))
    pad = _n_params(resnet32(in_channels=3, shortcut="pad"))
    assert 450_000 <= conv <= 480_000
    assert 455_000 <= pad <= 465_000
    assert pad < conv


def test_resnet32_rejects_unknown_shortcut() -> None:
    with pytest.raises(ValueError):
        resnet32(in_channels=3, shortcut="bogus")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "channels", "size"),
    [("resnet32", 3, 32), ("resnet18_cifar", 3, 32), ("convnet", 1, 28), ("convnet", 1, 8)],
)
def test_last_relu(name: str, channels: int, size: int) -> None:
    x = torch.randn(4, channels, size, size)
    for last_relu in (True, False):
        torch.manual_seed(0)
        net = build_backbone(name, in_channels=channels, image_size=size, last_relu=last_relu)
        # Eval mode (as when extracting features): in train mode BN centres the last
        # residual branch, and a non-negative identity shortcut can keep every pooled
        # feature of a freshly initialised resnet32 positive.
        with torch.no_grad():
            f = net.eval()(x)
        if last_relu:
            assert (f >= 0).all()
        else:
            assert (f < 0).any()


def test_last_relu_false_keeps_inner_relus() -> None:
    torch.manual_seed(0)
    with_relu = build_backbone("resnet32", in_channels=3, image_size=32)
    torch.manual_seed(0)
    without = build_backbone("resnet32", in_channels=3, image_size=32, last_relu=False)
    relu_flags = [b.last_relu for b in without.modules() if hasattr(b, "last_relu")]
    assert relu_flags.count(False) == 1 and relu_flags[-1] is False
    x = torch.randn(2, 3, 32, 32)
    # Same weights, only the very last ReLU differs: mean(relu(z)) >= mean(z) per feature.
    without.load_state_dict(with_relu.state_dict())
    assert (with_relu(x) >= without(x) - 1e-6).all()


def test_incremental_linear_grows_and_keeps_old_rows() -> None:
    torch.manual_seed(0)
    head = IncrementalLinear(8)
    assert head.num_classes == 0
    assert head(torch.randn(5, 8)).shape == (5, 0)
    head.add_classes(3)
    w, b = head.weight.detach().clone(), head.bias.detach().clone()
    head.add_classes(2)
    assert head.num_classes == 5
    assert head.weight.shape == (5, 8) and head.bias.shape == (5,)
    assert torch.equal(head.weight[:3], w) and torch.equal(head.bias[:3], b)
    assert isinstance(head.weight, nn.Parameter) and head.weight.requires_grad
    assert not torch.equal(head.weight[3:], torch.zeros(2, 8))


def test_incremental_linear_reset_parameters() -> None:
    torch.manual_seed(0)
    head = IncrementalLinear(8)
    head.add_classes(4)
    before = head.weight.detach().clone()
    head.reset_parameters()
    assert head.weight.shape == (4, 8)
    assert not torch.equal(head.weight, before)


def test_grown_model_keeps_old_logits() -> None:
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, image_size=8, width=8)
    assert isinstance(model, IncrementalNet) and model.num_classes == 0
    model.add_classes(2)
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        model.add_classes(3)
        after = model(x)
    assert model.num_classes == 5
    assert after["logits"].shape == (3, 5)
    # Old rows are bit-identical, but a GEMM over a larger weight matrix may block the
    # reduction differently, so the old columns agree to float rounding, not bit for bit.
    torch.testing.assert_close(after["logits"][:, :2], before["logits"], rtol=1e-6, atol=1e-6)
    assert torch.equal(after["features"], model.features(x))


def test_unknown_backbone_raises_user_error() -> None:
    with pytest.raises(UserError, match="unknown backbone 'nope'"):
        build_backbone("nope", in_channels=3, image_size=32)
    with pytest.raises(UserError):
        build_model("nope", in_channels=3, image_size=32)


def test_cilkit_info_describes_every_backbone(capsys) -> None:
    """Each built-in backbone is listed by `cilkit info` with a description of its own."""
    from cilkit.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet32", "resnet18", "resnet18_cifar", "convnet", "lenet"):
        line = next(row for row in out.splitlines() if row.strip().startswith(name))
        assert len(line.strip()) > len(name) + 10, line  # a description beside the name
    assert len({BACKBONE_DESCRIPTIONS[n] for n in BACKBONES}) == len(BACKBONES)  # none copied from another


@pytest.mark.parametrize(("name", "size"), [("resnet32", 32), ("convnet", 28)])
def test_construction_is_deterministic(name: str, size: int) -> None:
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(name, in_channels=3, image_size=size)
        model.add_classes(4)
        models.append(model)
    sd_a, sd_b = (m.state_dict() for m in models)
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_init_scheme() -> None:
    torch.manual_seed(0)
    net = build_backbone("resnet32", in_channels=3, image_size=32)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bns)
    conv = net.stem[0]
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5  # Kaiming normal, fan_out
    assert abs(conv.weight.std().item() - expected_std) < 0.5 * expected_std
