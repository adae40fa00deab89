"""Tests for the model seams: backbone stage maps (PODNet) and a growing backbone (DER)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cilkit.models import (
    GrowingBackbone,
    IncrementalLinear,
    IncrementalNet,
    build_backbone,
    build_model,
)

# (name, in_channels, image_size, width, input side, expected stage shapes without the batch
# dimension), written from the architectures in cilkit.models.backbones.
STAGE_CASES = [
    # CIFAR ResNet-32: 3x3 stem (16), stages of 16/32/64 channels, stride 2 at stages 2 and 3.
    ("resnet32", 3, 32, 32, 32, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    # ResNet-18 with a 3x3 stride-1 stem: 64/128/256/512 channels, stride 2 from stage 2 on.
    ("resnet18_cifar", 3, 32, 32, 32, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]),
    # ImageNet ResNet-18: stride-2 stem and max-pool divide 64 px by 4 before stage 1.
    ("resnet18", 3, 64, 32, 64, [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]),
    # convnet, image_size >= 16: stride-2 first conv (28 -> 14), max-pool at stage 2 (-> 7).
    ("convnet", 1, 28, 8, 28, [(8, 14, 14), (16, 7, 7)]),
    # convnet, 8 px: stride-1 first conv, max-pool at stage 2 (8 -> 4).
    ("convnet", 3, 8, 32, 8, [(32, 8, 8), (64, 4, 4)]),
    # LeNet: conv 5x5 pad 2 + pool (28 -> 14), conv 5x5 + pool (14 -> 10 -> 5).
    ("lenet", 1, 28, 32, 28, [(6, 14, 14), (16, 5, 5)]),
    # LeNet pads an 8 px input to 28 px first.
    ("lenet", 1, 8, 32, 8, [(6, 14, 14), (16, 5, 5)]),
    # LeNet on 40 px: 40 -> 20, 20 -> 16 -> 8 (the fc input is then pooled to 5x5).
    ("lenet", 3, 40, 32, 40, [(6, 20, 20), (16, 8, 8)]),
]


def _lenet_head(net: nn.Module, last: torch.Tensor) -> torch.Tensor:
    """What LeNet does after its last conv block, written out by hand."""
    if last.shape[-2:] != (5, 5):
        last = F.adaptive_avg_pool2d(last, 5)
    h = F.relu(F.linear(last.flatten(1), net.fc1.weight, net.fc1.bias))
    return F.relu(F.linear(h, net.fc2.weight, net.fc2.bias))


def _reference_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's forward as the code before the stage seam computed it, module by module."""
    name = type(net).__name__
    if name == "ResNet":
        return torch.flatten(F.adaptive_avg_pool2d(net.stages(net.stem(x)), 1), 1)
    if name == "ConvNet":
        return torch.flatten(F.adaptive_avg_pool2d(net.body(x), 1), 1)
    assert name == "LeNet"
    h, w = x.shape[-2:]
    dh, dw = max(0, 28 - h), max(0, 28 - w)
    x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
    x = F.max_pool2d(F.relu(net.conv1(x)), 2)
    x = F.max_pool2d(F.relu(net.conv2(x)), 2)
    return _lenet_head(net, x)


@pytest.mark.parametrize(("name", "channels", "image_size", "width", "side", "shapes"), STAGE_CASES)
def test_stages_shapes_and_last_stage_gives_features(
    name: str, channels: int, image_size: int, width: int, side: int, shapes: list[tuple[int, ...]]
) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, image_size=image_size, width=width)
    model.add_classes(3)
    model.eval()
    x = torch.randn(2, channels, side, side)
    with torch.no_grad():
        plain = model(x)
        out = model(x, stages=True)
    maps = out["stages"]
    assert [tuple(m.shape) for m in maps] == [(2, *s) for s in shapes]
    assert [tuple(m.shape) for m in model.backbone.stage_outputs(x)] == [(2, *s) for s in shapes]
    # The features are the last stage pooled as forward pools it (LeNet: its fc layers).
    if name == "lenet":
        expected = _lenet_head(model.backbone, maps[-1])
    else:
        expected = maps[-1].mean(dim=(2, 3))
    torch.testing.assert_close(plain["features"], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out["features"], plain["features"])
    assert torch.equal(out["logits"], plain["logits"])
    assert set(plain) == {"features", "logits"}  # the default output dict is unchanged


@pytest.mark.parametrize(("name", "channels", "image_size", "width", "side", "shapes"), STAGE_CASES)
def test_forward_unchanged_by_the_stage_seam(
    name: str, channels: int, image_size: int, width: int, side: int, shapes: list[tuple[int, ...]]
) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, in_channels=channels, image_size=image_size, width=width)
    x = torch.randn(3, channels, side, side)
    for train in (True, False):
        net.train(train)
        with torch.no_grad():
            assert torch.equal(net(x), _reference_features(net, x)), train


def test_state_dict_keys_unchanged() -> None:
    """Checkpoints of the earlier code still load: the module names did not move."""
    res = build_backbone("resnet32", in_channels=3, image_size=32).state_dict()
    assert "stem.0.weight" in res and "stages.0.0.conv1.weight" in res
    assert "stages.2.4.bn2.running_var" in res and "stages.1.0.shortcut.0.weight" in res
    conv = build_backbone("convnet", in_channels=1, image_size=28, width=8).state_dict()
    assert list(conv)[:2] == ["body.0.weight", "body.1.weight"] and "body.11.running_mean" in conv
    net = build_backbone("resnet32", in_channels=3, image_size=32)
    assert len(net.stages) == 3 and len(net.stages[0]) == 5


def test_stages_in_train_mode_is_one_forward_pass() -> None:
    """BN running statistics move once, as with the ordinary forward."""
    torch.manual_seed(0)
    a = build_model("resnet32", in_channels=3, image_size=32)
    b = copy.deepcopy(a)
    x = torch.randn(4, 3, 32, 32)
    a.train()(x)
    b.train()(x, stages=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.backbone.stages[0][0].bn1.num_batches_tracked.item() == 1


class PluginMLP(nn.Module):
    """A plugin-style backbone (as examples/my_backbone.py) without a stages method."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
        self.out_dim = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_backbone_without_stages_gives_clear_error() -> None:
    model = IncrementalNet(PluginMLP(), IncrementalLinear(4))
    model.add_classes(2)
    x = torch.randn(3, 1, 4, 4)
    assert model(x)["logits"].shape == (3, 2)  # the ordinary forward still works
    with pytest.raises(TypeError, match="backbone PluginMLP does not expose its stages"):
        model(x, stages=True)


def _tiny_convnet() -> nn.Module:
    return build_backbone("convnet", in_channels=1, image_size=8, width=4)  # 8-d features


def test_incremental_linear_add_inputs_appends_zero_columns() -> None:
    torch.manual_seed(0)
    head = IncrementalLinear(3)
    head.add_classes(2)
    w, b = head.weight.detach().clone(), head.bias.detach().clone()
    head.add_inputs(2)
    assert head.in_dim == 5 and head.weight.shape == (2, 5)
    assert torch.equal(head.weight[:, :3], w) and torch.equal(head.weight[:, 3:], torch.zeros(2, 2))
    assert torch.equal(head.bias, b) and head.weight.requires_grad
    f = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    expected = (w * torch.tensor([1.0, 2.0, 3.0])).sum(1) + b  # the new inputs count for nothing
    torch.testing.assert_close(head(f)[0], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        head.add_inputs(-1)


def test_growing_backbone_grow_keeps_old_features_logits_and_trains_only_new() -> None:
    torch.manual_seed(0)
    grower = GrowingBackbone(_tiny_convnet)
    model = IncrementalNet(grower, IncrementalLinear(grower.out_dim))
    model.add_classes(3)
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    model.train()(x)  # move the BN running statistics away from their initial values
    model.eval()
    with torch.no_grad():
        before = model(x)
    old_w = model.head.weight.detach().clone()
    first = grower.backbones[0]
    first_state = copy.deepcopy(first.state_dict())

    new = model.grow_backbone()
    assert len(grower.backbones) == 2 and grower.backbones[1] is new
    assert grower.out_dim == 16 and model.head.in_dim == 16 and model.head.weight.shape == (3, 16)
    assert torch.equal(model.head.weight[:, :8], old_w)
    assert torch.equal(model.head.weight[:, 8:], torch.zeros(3, 8))
    assert all(not p.requires_grad for p in first.parameters())
    assert all(p.requires_grad for p in new.parameters())

    model.train()
    assert model.training and new.training and not first.training  # the frozen one stays in eval
    out = model(x)
    assert out["features"].shape == (6, 16)
    # The old backbone's features are the eval-mode ones from before the grow, untouched.
    assert torch.equal(out["features"][:, :8], before["features"])
    with torch.no_grad():
        new_features = new(x)
    assert torch.equal(out["features"][:, 8:], new_features)
    assert not torch.equal(new_features, torch.zeros_like(new_features))
    # Zero columns: the logits are those before the grow (to GEMM rounding).
    torch.testing.assert_close(out["logits"], before["logits"], rtol=1e-6, atol=1e-6)

    model.add_classes(2)
    assert model.num_classes == 5 and model.head.weight.shape == (5, 16)
    assert torch.equal(model.head.weight[:3, :8], old_w)
    assert (model.head.weight[3:] != 0).all()  # new rows span old and new feature columns

    # One SGD step with every parameter handed to the optimiser (weight decay, momentum):
    # only the new backbone and the head change; the old backbone, BN statistics included,
    # is bit-identical.
    new_before = [p.detach().clone() for p in new.parameters()]
    head_before = [p.detach().clone() for p in model.head.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt.zero_grad()
    F.cross_entropy(model(x)["logits"], y).backward()
    assert all(p.grad is None for p in first.parameters())
    opt.step()
    state = first.state_dict()
    assert all(torch.equal(state[k], first_state[k]) for k in first_state)
    assert all(not torch.equal(p, q) for p, q in zip(new.parameters(), new_before))
    assert all(not torch.equal(p, q) for p, q in zip(model.head.parameters(), head_before))


def test_growing_backbone_options_and_errors() -> None:
    torch.manual_seed(0)
    grower = GrowingBackbone(_tiny_convnet)
    grower.grow(freeze_old=False)
    grower.train()
    assert all(b.training for b in grower.backbones)
    assert all(p.requires_grad for p in grower.parameters())
    assert grower(torch.randn(2, 1, 8, 8)).shape == (2, 16)
    with pytest.raises(TypeError, match="factory returned Identity"):
        GrowingBackbone(nn.Identity)
    # A backbone that cannot grow, a head that cannot widen, a container without stages.
    with pytest.raises(TypeError, match="backbone ConvNet cannot grow"):
        build_model("convnet", in_channels=1, image_size=8).grow_backbone()
    cosine = IncrementalNet(GrowingBackbone(_tiny_convnet), build_model(
        "convnet", in_channels=1, image_size=8, width=4, head="cosine").head)
    with pytest.raises(TypeError, match="SplitCosineLinear"):
        cosine.grow_backbone()
    assert len(cosine.backbone.backbones) == 1  # nothing grew before the refusal
    with pytest.raises(TypeError, match="backbone GrowingBackbone does not expose its stages"):
        cosine(torch.randn(2, 1, 8, 8), stages=True)
