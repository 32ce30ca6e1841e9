"""fold_batchnorm and convert on the layer shapes of timm's models, re-created here
(timm itself is not a test dependency): a BatchNorm with a fused activation
(BatchNormAct2d), a channels-first LayerNorm (LayerNorm2d), EfficientNet-style names
that no name rule pairs, a BN whose eval output is not its affine map, and a layer
whose output has a second user. Each fold either keeps the eval output or is left,
with the reason in the report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.nn import convert_with_report, fold_batchnorm_with_report

F64 = torch.float64


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d's shape: BN, then dropout and an activation."""

    def __init__(self, channels: int, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum or 0.0,
            self.eps,
        )
        return self.act(self.drop(x))


class LayerNorm2d(nn.LayerNorm):
    """timm.layers.LayerNorm2d's shape: a LayerNorm over the channels of NCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DepthwiseSeparable(nn.Module):
    """EfficientNet's block names: conv_dw/bn1, conv_pw/bn2 (no name rule pairs them)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = BatchNormAct2d(c)
        self.conv_pw = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn2 = BatchNormAct2d(2 * c, act=nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))


class EfficientNetLike(nn.Module):
    def __init__(self, traceable: bool = True) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(4)
        self.blocks = nn.Sequential(DepthwiseSeparable(4), DepthwiseSeparable(8))
        self.conv_head = nn.Conv2d(16, 12, 1)
        self.bn2 = nn.BatchNorm2d(12)
        self.norm = LayerNorm2d(12)
        self.classifier = nn.Linear(12, 5)
        self.traceable = traceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.traceable and bool(x.isfinite().all()):  # torch.fx cannot trace this
            x = x * 1.0
        x = self.blocks(self.bn1(self.conv_stem(x)))
        x = self.norm(torch.relu(self.bn2(self.conv_head(x))))
        return self.classifier(x.mean((2, 3)))


def _trained(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Non-trivial affine parameters and running statistics, in float64, eval mode."""
    model = model.to(F64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.3 + 1)
        model.train()
        for _ in range(3):
            model(torch.randn(shape, generator=gen, dtype=F64) * 2 + 0.5)
    return model.eval()


X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)


@pytest.mark.parametrize("traceable", [True, False])
def test_every_norm_of_an_efficientnet_like_model_folds_and_the_output_stays(
    traceable: bool,
) -> None:
    net = _trained(EfficientNetLike(traceable), tuple(X.shape))
    reference = net(X)
    check = None if traceable else X  # untraceable: pairs from a forward trace
    folded, report = fold_batchnorm_with_report(net, check_input=check)
    entries = {e.path: e for e in report.entries}
    assert sorted(entries) == [
        "blocks.0.bn1",
        "blocks.0.bn2",
        "blocks.1.bn1",
        "blocks.1.bn2",
        "bn1",
        "bn2",
    ]
    assert all(e.target for e in entries.values()), str(report)  # all 6 folded
    assert entries["bn2"].target == "Identity" and entries["bn2"].carried == [
        "folded into conv_head (Conv2d)"
    ]
    # The fused activations still run: the norms are kept with identity statistics.
    assert entries["bn1"].target == "BatchNormAct2d" and isinstance(folded.bn1.act, nn.SiLU)
    assert "kept as an identity normalization" in entries["blocks.1.bn1"].notes[0]
    torch.testing.assert_close(folded(X), reference, rtol=1e-9, atol=1e-9)
    assert isinstance(folded.norm, LayerNorm2d)  # not a BatchNorm: untouched


class BatchStatsBN(nn.BatchNorm2d):
    """Normalizes with the batch's statistics even in eval: no affine map to fold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class Reused(nn.Module):
    """The conv's output feeds the BN and a residual sum: folding would change the sum."""

    def __init__(self, traceable: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.traceable = traceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.traceable and bool(x.isfinite().all()):
            x = x * 1.0
        y = self.conv(x)
        return self.bn(y) + y


def test_a_bn_whose_eval_output_is_not_affine_is_left_with_the_reason() -> None:
    net = _trained(nn.Sequential(nn.Conv2d(3, 4, 3), BatchStatsBN(4)), tuple(X.shape))
    reference = net(X)
    folded, report = fold_batchnorm_with_report(net)
    (entry,) = report.entries
    assert entry.target == "" and "is not its running-statistics affine map" in entry.notes[0]
    assert isinstance(folded[1], BatchStatsBN)
    torch.testing.assert_close(folded(X), reference, rtol=0, atol=0)  # undone exactly


@pytest.mark.parametrize("traceable", [True, False])
def test_a_layer_output_with_a_second_user_is_not_folded(traceable: bool) -> None:
    net = _trained(Reused(traceable), tuple(X.shape))
    reference = net(X)
    folded, report = fold_batchnorm_with_report(net, check_input=None if traceable else X)
    (entry,) = report.entries
    assert entry.target == ""
    if traceable:  # the graph shows the second user
        assert entry.notes == ["the output of conv is also used by add()"]
    else:  # the trace pairs them; the check on check_input undoes the fold
        assert "changed the model's output on check_input" in entry.notes[0]
    assert isinstance(folded.bn, nn.BatchNorm2d)
    torch.testing.assert_close(folded(X), reference, rtol=0, atol=0)


@pytest.mark.parametrize("to", ["covshift", "group"])
def test_convert_leaves_subclasses_with_their_own_forward(to: str) -> None:
    net = _trained(EfficientNetLike(), tuple(X.shape))
    kw = {"num_groups": 2} if to == "group" else {}
    before = net(X)
    out, report = convert_with_report(net, to=to, **kw)
    subclasses = {"bn1", "blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2", "norm"}
    assert {e.path for e in report.skipped} == subclasses
    assert isinstance(out.bn1, BatchNormAct2d) and isinstance(out.norm, LayerNorm2d)
    assert report.entries[0].notes == [
        "left as is: BatchNormAct2d overrides BatchNorm2d's forward; replacing it would "
        "change its outputs"
    ]
    assert [e.path for e in report.replaced] == ["bn2"]
    if to == "covshift":  # same kinds: every output unchanged, and back to torch's
        assert type(out.bn2).__module__ == "covshift.nn.layers"
        torch.testing.assert_close(out(X), before, rtol=1e-9, atol=1e-9)
        back, report = convert_with_report(out, to="torch")
        assert [e.path for e in report.entries] == ["bn2"] and type(back.bn2) is nn.BatchNorm2d
        torch.testing.assert_close(back(X), before, rtol=1e-9, atol=1e-9)
