"""What docs/nn.md says about type checks: covshift's layers are not torch.nn subclasses,
so torch's replacement helpers leave them (and their variants) alone, and norm_kind
names what each layer is, for covshift's and torch.nn's alike."""

from __future__ import annotations

import torch
from torch import nn

import covshift.nn as cn


def test_layers_are_not_torch_subclasses_and_norm_kind_knows_both() -> None:
    pairs = [
        (cn.BatchNorm2d(4), nn.BatchNorm2d(4), "batch"),
        (cn.LayerNorm(4), nn.LayerNorm(4), "layer"),
        (cn.GroupNorm(2, 4), nn.GroupNorm(2, 4), "group"),
        (cn.InstanceNorm2d(4), nn.InstanceNorm2d(4), "instance"),
    ]
    for ours, theirs, kind in pairs:
        assert not isinstance(ours, type(theirs))
        assert cn.norm_kind(ours) == cn.norm_kind(theirs) == kind
    assert not isinstance(cn.BatchNorm2d(4), nn.modules.batchnorm._BatchNorm)
    assert cn.norm_kind(cn.BatchRenorm2d(4)) == "batch_renorm"
    assert cn.norm_kind(nn.Linear(2, 2)) is None


def test_torch_convert_sync_batchnorm_leaves_a_variant_as_it_is() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), cn.BatchRenorm2d(4), nn.BatchNorm2d(4))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # torch's helper swaps its own BatchNorm; covshift's Batch Renorm keeps its function
    assert type(converted[1]) is cn.BatchRenorm2d
    assert type(converted[2]) is nn.SyncBatchNorm
    x = torch.randn(8, 3, 6, 6)
    model.eval()
    torch.testing.assert_close(converted[1](converted[0](x)), model[1](model[0](x)))
