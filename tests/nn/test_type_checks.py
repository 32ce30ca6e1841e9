"""What docs/nn.md says about type checks: covshift's plain layers are torch.nn's classes
(``isinstance`` holds), so torch's, timm's and Hugging Face's code that finds norm
layers by ``isinstance`` reaches them and does what it does on torch.nn's, outputs
kept; the variants are not, so no such helper replaces one by plain BatchNorm."""

from __future__ import annotations

import copy
import importlib
from types import ModuleType

import pytest
import torch
from torch import nn

import covshift.nn as cn

PLAIN = [
    (lambda: cn.BatchNorm1d(4), nn.BatchNorm1d, "batch"),
    (lambda: cn.BatchNorm2d(4), nn.BatchNorm2d, "batch"),
    (lambda: cn.BatchNorm3d(4), nn.BatchNorm3d, "batch"),
    (lambda: cn.LayerNorm(4), nn.LayerNorm, "layer"),
    (lambda: cn.GroupNorm(2, 4), nn.GroupNorm, "group"),
    (lambda: cn.InstanceNorm1d(4), nn.InstanceNorm1d, "instance"),
    (lambda: cn.InstanceNorm2d(4), nn.InstanceNorm2d, "instance"),
    (lambda: cn.InstanceNorm3d(4), nn.InstanceNorm3d, "instance"),
    (lambda: cn.RMSNorm(4), nn.RMSNorm, "rms"),
    (lambda: cn.SyncBatchNorm(4), nn.SyncBatchNorm, "sync_batch"),
]


@pytest.mark.parametrize(("build", "torch_class", "kind"), PLAIN, ids=lambda v: str(v))
def test_plain_layers_are_their_torch_class(build, torch_class: type, kind: str) -> None:
    ours = build()
    assert isinstance(ours, torch_class)
    assert cn.norm_kind(ours) == kind
    assert repr(ours) == repr(cn.convert(copy.deepcopy(ours), to="torch"))


def test_variants_are_not_torch_norm_classes() -> None:
    batch_classes = (nn.modules.batchnorm._BatchNorm, nn.BatchNorm2d, nn.SyncBatchNorm)
    for variant, kind in [
        (cn.BatchRenorm2d(4), "batch_renorm"),
        (cn.GhostBatchNorm2d(4), "ghost_batch"),
    ]:
        assert not isinstance(variant, batch_classes)
        assert cn.norm_kind(variant) == kind
    assert cn.norm_kind(nn.Linear(2, 2)) is None


def _model() -> nn.Sequential:
    """Conv, covshift BatchNorm2d, a Batch Renorm, a Ghost BN, covshift's SyncBatchNorm,
    with running statistics that moved."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        cn.BatchNorm2d(4),
        nn.ReLU(),
        cn.BatchRenorm2d(4, warmup_steps=0, r_max_ramp_steps=1, d_max_ramp_steps=1),
        cn.GhostBatchNorm2d(4, virtual_batch_size=4),
        nn.Conv2d(4, 4, 1),
        cn.SyncBatchNorm(4),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p))
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6) * 2 + 1)
    return model


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval output, then one training step's output on a copy (running stats move)."""
    with torch.no_grad():
        return model.eval()(x), copy.deepcopy(model).train()(x)


def _twin(model: nn.Module) -> nn.Module:
    """The same model with torch.nn's classes where torch has one (variants stay)."""
    return cn.convert(copy.deepcopy(model), to="torch", on_drop="ignore")


def test_torch_convert_sync_batchnorm_treats_covshift_layers_as_torch_ones() -> None:
    model = _model()
    x = torch.randn(8, 3, 6, 6)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    on_torch = nn.SyncBatchNorm.convert_sync_batchnorm(_twin(model))
    assert [type(m) for m in converted] == [type(m) for m in on_torch]
    assert type(converted[1]) is nn.SyncBatchNorm and type(converted[6]) is nn.SyncBatchNorm
    # The variants are left as they are: a plain SyncBatchNorm would drop their function.
    assert type(converted[3]) is cn.BatchRenorm2d and type(converted[4]) is cn.GhostBatchNorm2d
    for got, want in zip(_outputs(converted, x), _outputs(model, x), strict=True):
        torch.testing.assert_close(got, want)


def _timm_layers() -> ModuleType:
    # timm is in the test extra (with a torchvision built for the installed torch:
    # scripts/install.sh --test); its absence is a broken test environment, not a skip.
    return importlib.import_module("timm.layers")


def test_timm_freeze_batch_norm_2d_treats_covshift_layers_as_torch_ones() -> None:
    timm_layers = _timm_layers()
    model = _model()
    x = torch.randn(8, 3, 6, 6)
    frozen = timm_layers.freeze_batch_norm_2d(copy.deepcopy(model))
    on_torch = timm_layers.freeze_batch_norm_2d(_twin(model))
    assert [type(m) for m in frozen] == [type(m) for m in on_torch]
    assert type(frozen[1]).__name__ == type(frozen[6]).__name__ == "FrozenBatchNorm2d"
    assert type(frozen[3]) is cn.BatchRenorm2d and type(frozen[4]) is cn.GhostBatchNorm2d
    with torch.no_grad():
        torch.testing.assert_close(frozen.eval()(x), model.eval()(x))


def test_hugging_face_init_reaches_covshift_layers() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=16,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=8,
    )
    hf_model = transformers.BertModel(config)
    layers = [cn.BatchNorm2d(4), cn.GroupNorm(2, 4), cn.LayerNorm(4), cn.BatchRenorm2d(4)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.fill_(3.0)
            layer.bias.fill_(2.0)
        hf_model._init_weights(layer)  # the init every Hugging Face model runs
    for layer in layers[:3]:  # found by isinstance (LayerNorm also by its name)
        assert torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.bias, torch.zeros(4))
    assert torch.equal(layers[3].weight, torch.full((4,), 3.0))  # a variant: left alone
