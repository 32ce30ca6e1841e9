"""create_norm builds covshift's own layers."""

from __future__ import annotations

import pytest
import torch

import covshift.nn as cn
from covshift.nn import create_norm, norm_names


@pytest.mark.parametrize(
    ("name", "dims", "cls"),
    [
        ("batch", 1, cn.BatchNorm1d),
        ("batch", 2, cn.BatchNorm2d),
        ("batch", 3, cn.BatchNorm3d),
        ("instance", 1, cn.InstanceNorm1d),
        ("instance", 2, cn.InstanceNorm2d),
        ("instance", 3, cn.InstanceNorm3d),
        ("layer", 1, cn.LayerNorm),
        ("layer", 2, cn.GroupNorm),
        ("group", 2, cn.GroupNorm),
        ("rms", 1, cn.RMSNorm),
    ],
)
def test_create_norm_builds_covshift_layers(name: str, dims: int, cls: type) -> None:
    layer = create_norm(name, 64, dims=dims)
    assert type(layer) is cls
    shape = {1: (4, 64), 2: (4, 64, 3, 3), 3: (2, 64, 2, 2, 2)}[dims]
    if name == "instance" and dims == 1:
        shape = (4, 64, 5)
    y = layer(torch.randn(shape))
    assert y.shape == shape


def test_core_names_are_registered() -> None:
    assert {"batch", "group", "instance", "layer", "rms"} <= set(norm_names())


def test_layer_for_images_is_groupnorm_with_one_group() -> None:
    layer = create_norm("layer", 8, dims=2)
    assert isinstance(layer, cn.GroupNorm) and layer.num_groups == 1


def test_group_caps_groups_at_channels_and_forwards_kwargs() -> None:
    assert create_norm("group", 64, dims=2).num_groups == 32
    assert create_norm("group", 16, dims=2).num_groups == 16
    layer = create_norm("group", 64, dims=2, num_groups=8, eps=1e-3, affine=False)
    assert (layer.num_groups, layer.eps, layer.weight) == (8, 1e-3, None)
    bn = create_norm("batch", 8, dims=2, momentum=None, track_running_stats=False)
    assert bn.momentum is None and bn.running_mean is None


def test_unknown_name_and_bad_dims_are_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown normalization 'nope'; known: .*batch"):
        create_norm("nope", 8)
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        create_norm("batch", 8, dims=4)
    with pytest.raises(ValueError, match="eps must be"):
        create_norm("batch", 8, eps=0.0)


def test_group_default_divides_channels_and_keeps_mlp_groups_non_trivial() -> None:
    from covshift.nn.registry import default_num_groups

    assert create_norm("group", 100, dims=2).num_groups == 25  # largest divisor <= 32
    assert create_norm("group", 32, dims=2).num_groups == 32  # 1 channel per group: fine
    assert create_norm("group", 32, dims=1).num_groups == 16  # MLP: >= 2 features per group
    assert default_num_groups(7, dims=1) == 1
    with pytest.raises(ValueError, match="at least 2 channels per group"):
        create_norm("group", 1, dims=1)
