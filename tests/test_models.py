"""The MLP and CNN builders."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from covshift.models import build_cnn, build_mlp, cancels_bias
from covshift.nn import norm_names


def test_mlp_shape_and_names() -> None:
    net = build_mlp(784, 10, width=100, depth=3)
    assert net(torch.rand(60, 784)).shape == (60, 10)
    names = {n for n, _ in net.named_modules()}
    assert {"hidden.0.linear", "hidden.2.act", "head"} <= names
    assert "hidden.0.norm" not in names
    assert all(isinstance(b.act, nn.Sigmoid) for b in net.hidden)
    # 784*100 + 100 + 2*(100*100 + 100) + 100*10 + 10 parameters
    assert sum(p.numel() for p in net.parameters()) == 784 * 100 + 100 + 2 * 10100 + 1010


def test_bn_before_activation_drops_bias() -> None:
    net = build_mlp(20, 3, width=8, depth=2, norm="batch")
    for block in net.hidden:
        assert block.linear.bias is None
        assert isinstance(block.norm, nn.Module) and block.norm.num_features == 8
    assert net.head.bias is not None


@pytest.mark.parametrize(
    ("norm", "position", "has_bias"),
    [
        ("batch", "after", True),  # Linear -> sigmoid -> BN: the bias matters
        ("layer", "before", True),  # LayerNorm does not cancel a per-feature bias
        ("rms", "before", True),
        ("none", "before", True),
        ("batch", "before", False),
    ],
)
def test_bias_rule(norm: str, position: str, has_bias: bool) -> None:
    net = build_mlp(20, 3, width=8, depth=1, norm=norm, norm_position=position)
    assert (net.hidden[0].linear.bias is not None) == has_bias


def test_bias_cancelling_is_real() -> None:
    # What "cancels" claims: adding a per-feature constant before BN (train mode)
    # changes nothing.
    bn = nn.BatchNorm1d(5)
    x = torch.randn(16, 5)
    assert torch.allclose(bn(x), bn(x + torch.randn(5)), atol=1e-5)
    assert cancels_bias("batch") and not cancels_bias("layer")


def test_norm_placement_order() -> None:
    torch.manual_seed(0)
    before = build_mlp(
        6, 2, width=4, depth=1, norm="batch", norm_position="before", activation="relu"
    )
    x = torch.randn(10, 6)
    block = before.hidden[0]
    expected = torch.relu(block.norm(block.linear(x)))
    assert torch.allclose(block(x), expected)
    after = build_mlp(
        6, 2, width=4, depth=1, norm="batch", norm_position="after", activation="relu"
    )
    block = after.hidden[0]
    assert torch.allclose(block(x), block.norm(torch.relu(block.linear(x))))


@pytest.mark.parametrize(
    ("init", "expected_std"),
    [
        ("gaussian", 0.05),
        ("xavier", math.sqrt(2 / (400 + 300))),
        ("he", math.sqrt(2 / 400)),
    ],
)
def test_init_scales(init: str, expected_std: float) -> None:
    net = build_mlp(400, 3, width=300, depth=2, init=init, init_std=0.05, activation="relu")
    w = net.hidden[1].linear.weight.detach()
    if init == "he":  # relu gain sqrt(2), fan_in 300 for the second layer
        expected_std = math.sqrt(2 / 300)
    if init == "xavier":  # relu gain sqrt(2), fan_in + fan_out = 600
        expected_std = math.sqrt(2) * math.sqrt(2 / 600)
    assert abs(float(w.std()) - expected_std) / expected_std < 0.02
    assert abs(float(w.mean())) < 0.01 * expected_std * 10
    assert torch.count_nonzero(net.hidden[1].linear.bias) == 0


def test_same_seed_same_weights_across_norms() -> None:
    a = build_mlp(30, 4, width=10, norm="none", seed=7)
    b = build_mlp(30, 4, width=10, norm="batch", seed=7)
    c = build_mlp(30, 4, width=10, norm="none", seed=8)
    for i in range(3):
        assert torch.equal(a.hidden[i].linear.weight, b.hidden[i].linear.weight)
    assert not torch.equal(a.hidden[0].linear.weight, c.hidden[0].linear.weight)
    # building does not disturb the global random stream
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    build_mlp(30, 4, init="torch")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("norm", ["none", *(n for n in norm_names() if n != "instance")])
def test_every_registered_norm_builds_and_runs(norm: str) -> None:
    net = build_mlp(12, 3, width=32, depth=2, norm=norm)
    out = net(torch.rand(8, 12))
    assert out.shape == (8, 3) and torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"activation": "gelu"},
            "activation must be one of sigmoid, tanh, relu, identity, linear; got 'gelu'",
        ),
        ({"norm": "weird"}, "norm must be one of none, "),
        ({"norm_position": "middle"}, "norm_position must be one of before, after"),
        ({"init": "orthogonal"}, "init must be one of gaussian, xavier, he, torch"),
        ({"depth": 0}, "depth must be >= 1"),
        ({"init_std": 0.0}, "init_std must be > 0"),
        ({"norm": "instance"}, "an MLP has none; use it in a CNN"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_mlp(10, 2, **kwargs)


@pytest.mark.parametrize("norm", ["none", "batch", "group", "layer"])
def test_cnn(norm: str) -> None:
    net = build_cnn((1, 28, 28), 10, channels=(8, 16), norm=norm)
    out = net(torch.rand(4, 784))
    assert out.shape == (4, 10)
    assert isinstance(net.features[1].linear, nn.Conv2d)
    assert (net.features[0].linear.bias is None) == (norm == "batch")
