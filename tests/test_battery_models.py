"""The battery's builders and task: VGG, the deep linear network, identity units, the
linear-regression data and its loss, frozen layers; each against an independent
computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from covshift.data import load_dataset
from covshift.experiments.config import ConfigError, ModelSpec
from covshift.experiments.point import build_model
from covshift.losses import squared_error
from covshift.models import build_cnn, build_deep_linear, build_mlp, build_vgg
from covshift.training import TrainConfig, evaluate, train


def test_vgg_matches_a_hand_written_forward() -> None:
    torch.manual_seed(0)
    net = build_vgg((1, 12, 12), 5, width=4, depth=5, convs_per_stage=2, seed=3).eval()
    x = torch.rand(3, 144)
    h = x.view(3, 1, 12, 12)
    convs = [b.linear for b in net.features]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 16]  # doubling per stage
    for i, conv in enumerate(convs):
        h = F.relu(F.conv2d(h, conv.weight, conv.bias, padding=1))
        if i in (1, 3):  # after each full stage of 2
            h = F.max_pool2d(h, 2)
    expected = F.linear(h.mean(dim=(2, 3)), net.head.weight, net.head.bias)
    torch.testing.assert_close(net(x), expected)
    assert net.pool_after == frozenset({1, 3})


def test_vgg_stops_pooling_at_one_pixel_and_shares_weights_across_norms() -> None:
    net = build_vgg((1, 4, 4), 3, width=2, depth=8, convs_per_stage=1)
    assert net.pool_after == frozenset({0, 1})  # 4 -> 2 -> 1, then no more pools
    assert net(torch.rand(2, 16)).shape == (2, 3)
    plain = build_vgg((1, 8, 8), 3, width=4, depth=2, seed=7)
    normed = build_vgg((1, 8, 8), 3, width=4, depth=2, norm="batch", seed=7)
    for a, b in zip(plain.features, normed.features, strict=True):
        torch.testing.assert_close(a.linear.weight, b.linear.weight)
        assert b.linear.bias is None  # cancelled by BN's mean subtraction
    with pytest.raises(ValueError, match="depth must be >= 1"):
        build_vgg((1, 8, 8), 3, depth=0)


def test_deep_linear_network_is_the_product_of_its_maps() -> None:
    net = build_deep_linear(6, 4, depth=5, seed=1)
    assert len(net.hidden) == 4 and all(b.linear.bias is None for b in net.hidden)
    product = net.head.weight
    for block in reversed(net.hidden):
        product = product @ block.linear.weight
    x = torch.randn(7, 6)
    torch.testing.assert_close(net(x), x @ product.T, rtol=1e-5, atol=1e-5)
    # Xavier normal with gain 1: std sqrt(2 / (fan_in + fan_out)) = sqrt(2/12)
    w = build_deep_linear(200, 200, depth=2, seed=0).hidden[0].linear.weight
    assert abs(w.std().item() - math.sqrt(2 / 400)) < 0.002
    with pytest.raises(ValueError, match="depth must be >= 2"):
        build_deep_linear(4, 4, depth=1)


def test_identity_units_make_an_affine_mlp() -> None:
    net = build_mlp(5, 3, width=4, depth=2, activation="identity", seed=2)
    x = torch.randn(6, 5)
    h = x
    for block in net.hidden:
        h = F.linear(h, block.linear.weight, block.linear.bias)
    torch.testing.assert_close(net(x), F.linear(h, net.head.weight, net.head.bias))
    alias = build_mlp(5, 3, width=4, depth=2, activation="linear", seed=2)
    torch.testing.assert_close(alias(x), net(x))


def test_linear_regression_data_is_y_equals_a_x() -> None:
    data = load_dataset("linear-regression")
    assert data.is_regression and data.num_classes == 10 and data.image_shape is None
    a = torch.linalg.lstsq(data.x_train, data.y_train).solution.T  # (K, D)
    torch.testing.assert_close(data.x_test @ a.T, data.y_test, rtol=1e-4, atol=1e-4)
    again = load_dataset("linear-regression")
    torch.testing.assert_close(again.x_train, data.x_train)


def test_regression_trains_on_summed_squared_error() -> None:
    out, y = torch.randn(5, 3), torch.randn(5, 3)
    assert squared_error(out, y).item() == pytest.approx(((out - y) ** 2).sum(1).mean().item())
    data = load_dataset("linear-regression")
    net = build_deep_linear(10, 10, depth=3, seed=0)
    metrics = evaluate(net, data.x_test, data.y_test)
    assert set(metrics) == {"test_loss"}
    with torch.no_grad():
        expected = ((net(data.x_test) - data.y_test) ** 2).sum(1).mean().item()
    assert metrics["test_loss"] == pytest.approx(expected, rel=1e-5)
    result = train(net, data, TrainConfig(steps=50, batch_size=1000, lr=1e-3, eval_every=25))
    assert result.history[50]["test_loss"] < result.history[0]["test_loss"]


def test_frozen_layers_keep_their_weights_and_the_rest_train() -> None:
    data = load_dataset("synthetic", n_train=300, n_test=100, num_features=16)
    spec = ModelSpec(width=8, depth=3, freeze=("hidden.1",))
    net = build_model(spec, data, seed=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train(net, data, TrainConfig(steps=20, batch_size=30, lr=0.5, eval_every=0))
    after = net.state_dict()
    assert torch.equal(before["hidden.1.linear.weight"], after["hidden.1.linear.weight"])
    assert torch.equal(before["hidden.1.linear.bias"], after["hidden.1.linear.bias"])
    assert not torch.equal(before["hidden.0.linear.weight"], after["hidden.0.linear.weight"])
    assert not torch.equal(before["hidden.2.linear.weight"], after["hidden.2.linear.weight"])


def test_a_freeze_pattern_that_matches_nothing_names_the_modules() -> None:
    data = load_dataset("synthetic", n_train=50, n_test=20, num_features=16)
    with pytest.raises(ConfigError, match=r"'hidden\.9' matches no module.*hidden\.0\.linear"):
        build_model(ModelSpec(width=8, depth=2, freeze=("hidden.9",)), data, seed=0)


def test_cnn_flatten_head_reads_the_whole_map() -> None:
    net = build_cnn((1, 9, 9), 4, channels=(3, 5), pool="flatten", seed=0).eval()
    assert net.head.in_features == 5 * 5 * 5  # 9 -> 5 after one stride-2 block
    x = torch.rand(2, 81)
    h = x.view(2, 1, 9, 9)
    for block in net.features:
        h = F.relu(
            F.conv2d(
                h, block.linear.weight, block.linear.bias, stride=block.linear.stride, padding=1
            )
        )
    torch.testing.assert_close(net(x), F.linear(h.flatten(1), net.head.weight, net.head.bias))
    with pytest.raises(ValueError, match="pool must be one of avg, flatten"):
        build_cnn((1, 9, 9), 4, pool="max")  # type: ignore[arg-type]
