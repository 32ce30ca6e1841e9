"""convert(): swapping norm layers, round trips and reports; fold_batchnorm and
freeze_batchnorm."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import covshift.nn as cn
from covshift.nn import (
    BatchRenorm2d,
    ConversionWarning,
    GhostBatchNorm1d,
    NoisyNorm,
    SyncBatchNorm,
    WSConv2d,
    convert,
    convert_with_report,
    fold_batchnorm,
    fold_batchnorm_with_report,
    freeze_batchnorm,
    unfreeze_batchnorm,
)

F64 = torch.float64


def _models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Models holding every torch.nn norm kind, with an input shape for each."""
    return [
        (
            "mlp",
            nn.Sequential(
                nn.Linear(5, 6),
                nn.BatchNorm1d(6, momentum=None),
                nn.LayerNorm(6, eps=1e-3),
                nn.RMSNorm(6),
                nn.Linear(6, 4),
                nn.LayerNorm(4, bias=False),
                nn.RMSNorm(4, eps=1e-4, elementwise_affine=False),
            ),
            (8, 5),
        ),
        (
            "cnn",
            nn.Sequential(
                nn.Conv2d(3, 6, 3),
                nn.BatchNorm2d(6, momentum=0.3),
                nn.GroupNorm(3, 6),
                nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
                nn.InstanceNorm2d(6),
                nn.LayerNorm([6, 3, 3]),
            ),
            (4, 3, 5, 5),
        ),
        (
            "seq",
            nn.Sequential(
                nn.Conv1d(2, 4, 3),
                nn.BatchNorm1d(4, affine=False),
                nn.InstanceNorm1d(4, affine=True),
            ),
            (3, 2, 7),
        ),
        ("vol", nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3, eps=1e-3)), (2, 2, 3, 3, 3)),
    ]


def _randomize(model: nn.Module, shape: tuple[int, ...]) -> None:
    """Non-trivial affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weight" in name or "bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + 1)
    model.train()
    for _ in range(2):
        model(torch.randn(shape, generator=gen, dtype=F64))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("index", range(4))
def test_round_trip_torch_covshift_torch(index):
    _, model, shape = _models()[index]
    model = model.to(F64)
    _randomize(model, shape)
    original = copy.deepcopy(model)
    x = torch.randn(shape, dtype=F64)
    n_norms = sum(cn.norm_kind(m) is not None for m in model.modules())

    ours, report = convert_with_report(copy.deepcopy(model), to="covshift")
    assert len(report.replaced) == n_norms and not report.lossy
    assert all(
        type(m).__module__ == "covshift.nn.layers" for m in ours.modules() if cn.norm_kind(m)
    )
    back, report_back = convert_with_report(copy.deepcopy(ours), to="torch")
    assert len(report_back.replaced) == n_norms and not report_back.lossy
    assert [type(m) for m in back.modules()] == [type(m) for m in original.modules()]
    # Same state_dict keys and values all the way.
    for m in (ours, back):
        state = m.state_dict()
        assert state.keys() == original.state_dict().keys()
        for k, v in original.state_dict().items():
            torch.testing.assert_close(state[k], v)
    # Eval outputs, then a training step: outputs, input grads, running statistics.
    for m in (original, ours, back):
        m.eval()
    y = original(x)
    torch.testing.assert_close(ours(x), y)
    torch.testing.assert_close(back(x), y)
    results = []
    for m in (original, ours, back):
        m.train()
        xr = x.clone().requires_grad_(True)
        out = m(xr)
        (grad,) = torch.autograd.grad((out * out.detach().cos()).sum(), [xr])
        results.append((out.detach(), grad, _state(m)))
    for out, grad, state in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        torch.testing.assert_close(grad, results[0][1])
        for k, v in results[0][2].items():
            torch.testing.assert_close(state[k], v)


def test_report_lists_dropped_state_and_warns():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.LayerNorm(6)).to(F64)
    _randomize(model, (8, 4))
    with pytest.warns(ConversionWarning, match="running_mean, running_var"):
        out = convert(copy.deepcopy(model), to="group", num_groups=2)
    assert isinstance(out[1], cn.GroupNorm) and out[1].num_groups == 2
    _, report = convert_with_report(copy.deepcopy(model), to="group", num_groups=2)
    bn_entry, ln_entry = report.entries
    assert (bn_entry.path, bn_entry.source, bn_entry.target) == ("1", "BatchNorm1d", "GroupNorm")
    assert {"weight", "bias", "eps"} <= set(bn_entry.carried)
    assert any("running_mean" in d for d in bn_entry.dropped)
    assert any("trailing vs dim 1" in n for n in ln_entry.notes)
    assert any("assumed dims=1" in n for n in ln_entry.notes)
    assert "1: BatchNorm1d -> GroupNorm; dropped: running_mean" in str(report)
    with pytest.raises(ValueError, match="lost state"):
        convert(copy.deepcopy(model), to="group", num_groups=2, on_drop="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(copy.deepcopy(model), to="group", num_groups=2, on_drop="ignore")
    # Fresh (never updated) running statistics carry no information: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(nn.Sequential(nn.BatchNorm1d(6)), to="layer")


def test_carried_values_eps_momentum_requires_grad_mode_dtype():
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.25, dtype=F64)
    _randomize(bn, (5, 4, 2, 2))
    bn.weight.requires_grad_(False)
    bn.eval()
    new = convert(bn, to="batch_renorm", on_drop="raise")  # the root itself is a norm
    assert isinstance(new, BatchRenorm2d)
    assert new.eps == 1e-3 and new.momentum == 0.25 and not new.training
    assert new.weight.dtype == F64 and not new.weight.requires_grad and new.bias.requires_grad
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(new, k), getattr(bn, k))
    # kw wins over carrying.
    assert convert(bn, to="batch", eps=0.5).eps == 0.5


def test_affine_that_does_not_fit_or_has_no_place_is_reported():
    ln = nn.LayerNorm([3, 2, 2])  # element-wise affine over (C, H, W): no per-channel form
    with torch.no_grad():
        ln.weight.uniform_()
    _, report = convert_with_report(ln, to="batch", dims=2)
    assert any("shape (3, 2, 2) does not fit (3,)" in d for d in report.entries[0].dropped)
    bn = nn.BatchNorm2d(3)
    # InstanceNorm2d has no affine by default: an identity affine is no loss...
    _, report = convert_with_report(bn, to=nn.InstanceNorm2d)
    assert report.entries[0].dropped == [] and not report.lossy
    # ...a trained one is.
    with torch.no_grad():
        bn.bias.fill_(0.5)
    _, report = convert_with_report(bn, to=nn.InstanceNorm2d)
    assert "bias: the target has no bias" in report.entries[0].dropped


def test_targets_mapping_class_factory():
    net = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm1d(4), nn.LayerNorm(4))
    out = convert(copy.deepcopy(net), to={nn.BatchNorm2d: nn.GroupNorm}, num_groups=2)
    assert type(out[0]) is nn.GroupNorm and out[0].num_groups == 2
    assert type(out[1]) is nn.BatchNorm1d and type(out[2]) is nn.LayerNorm
    out = convert(copy.deepcopy(net), to={"layer": "rms"})
    assert type(out[2]) is cn.RMSNorm and type(out[0]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="num_groups"):
        convert(copy.deepcopy(net), to=nn.GroupNorm)

    def factory(channels, dims):
        return cn.create_norm("ghost_batch", channels, dims=dims, virtual_batch_size=2)

    out = convert(copy.deepcopy(net), to={nn.BatchNorm1d: factory}, on_drop="raise")
    assert type(out[1]) is GhostBatchNorm1d and out[1].virtual_batch_size == 2
    with pytest.raises(ValueError, match="unknown normalization"):
        convert(copy.deepcopy(net), to="no_such_norm")


def test_subclasses_shared_modules_and_nested_wrappers():
    class BNAct(nn.BatchNorm2d):  # timm-style: a BatchNorm with a fused activation
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(super().forward(x))

    shared = nn.BatchNorm1d(3)
    fused = BNAct(3)
    net = nn.Sequential(fused, nn.Sequential(shared), shared, NoisyNorm(nn.BatchNorm2d(3)))
    out, report = convert_with_report(net, to="covshift")
    entry = report.entries[0]
    # A subclass with its own forward is left as it is (its activation would be lost).
    assert out[0] is fused and entry.source == "BNAct" and entry.target == ""
    assert entry.notes == [
        "left as is: BNAct overrides BatchNorm2d's forward; replacing it would change its outputs"
    ]
    assert out[1][0] is out[2]  # a shared module is converted once, stays shared
    assert sum(e.source == "BatchNorm1d" for e in report.entries) == 1
    assert isinstance(out[3], NoisyNorm) and type(out[3].norm) is cn.BatchNorm2d


def test_convert_to_noisy_batchnorm_carries_into_the_wrapped_norm():
    bn = nn.BatchNorm2d(3, dtype=F64)
    _randomize(bn, (4, 3, 2, 2))
    new = convert(bn, to="batch_noisy", on_drop="raise")
    assert isinstance(new, NoisyNorm) and type(new.norm) is cn.BatchNorm2d
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(new.norm, k), getattr(bn, k))


def test_variants_and_sync_convert_to_torch():
    net = nn.Sequential(SyncBatchNorm(3), BatchRenorm2d(3))
    net[0].original_class = nn.BatchNorm2d
    with pytest.warns(ConversionWarning, match="no torch implementation"):
        out = convert(net, to="torch")
    assert type(out[0]) is nn.SyncBatchNorm and isinstance(out[1], BatchRenorm2d)
    back = convert(out, to="covshift")
    assert type(back[0]) is SyncBatchNorm


# --------------------------------------------------------------------------------------
# fold_batchnorm
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer,bn,shape",
    [
        (nn.Linear(5, 4), nn.BatchNorm1d(4), (6, 5)),
        (nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4, affine=False), (6, 5)),
        (nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), (2, 3, 5, 5)),
        (nn.Conv2d(4, 4, 3, bias=False, groups=2), cn.BatchNorm2d(4), (2, 4, 5, 5)),
        (nn.Conv1d(3, 4, 2), SyncBatchNorm(4), (2, 3, 5)),
        (nn.Conv3d(2, 3, 2, bias=False), nn.BatchNorm3d(3), (2, 2, 3, 3, 3)),
    ],
)
def test_fold_batchnorm_equivalence(layer, bn, shape):
    net = nn.Sequential(layer, bn, nn.ReLU()).to(F64)
    _randomize(net, shape)
    net.eval()
    x = torch.randn(shape, dtype=F64)
    folded, report = fold_batchnorm_with_report(net)
    assert isinstance(folded[1], nn.Identity) and not isinstance(net[1], nn.Identity)
    assert report.entries[0].target == "Identity" and folded[0].bias is not None
    torch.testing.assert_close(folded(x), net(x))
    # float32 within float tolerance too.
    net32, folded32 = net.float(), fold_batchnorm(net.float())
    torch.testing.assert_close(folded32(x.float()), net32(x.float()), rtol=1e-5, atol=1e-5)


def test_fold_by_name_and_what_is_not_folded():
    class Block(nn.Module):  # torchvision-ResNet-style names
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))

    net = nn.Sequential(
        Block(),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # after a ReLU: stays
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4, track_running_stats=False),  # batch statistics in eval: stays
        WSConv2d(4, 4, 1),
        nn.BatchNorm2d(4),  # after a weight-standardized conv: stays
    ).to(F64)
    _randomize(net, (3, 3, 4, 4))
    net.eval()
    x = torch.randn(3, 3, 4, 4, dtype=F64)
    folded, report = fold_batchnorm_with_report(net, check_input=x)
    targets = {e.path: (e.target, e.notes) for e in report.entries}
    assert targets["0.bn1"][0] == targets["0.bn2"][0] == "Identity"
    assert "preceded by ReLU" in targets["2"][1][0]
    assert "no running statistics" in targets["4"][1][0]
    assert "preceded by WSConv2d" in targets["6"][1][0]
    torch.testing.assert_close(folded(x), net(x))


class _Odd(nn.Module):
    """conv -> relu -> bn: names pair conv with bn, but bn does not consume conv."""

    def __init__(self, traceable: bool = True):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)
        self.traceable = traceable

    def forward(self, x):
        if not self.traceable and x.sum() > -1e9:  # data-dependent: torch.fx cannot trace
            x = x + 0
        return self.bn(torch.relu(self.conv(x)))


def test_fold_follows_the_dataflow_not_the_names():
    net = _Odd().to(F64)
    _randomize(net, (4, 2, 3, 3))
    x = torch.randn(4, 2, 3, 3, dtype=F64)
    folded, report = fold_batchnorm_with_report(net.eval(), by_name=True)
    ((entry,),) = [report.entries]
    assert entry.target == "" and entry.notes == ["its input comes from relu()"]
    assert isinstance(folded.bn, nn.BatchNorm2d)
    torch.testing.assert_close(folded(x), net(x))
    # Untraceable: a forward trace on check_input sees the same.
    odd = _Odd(traceable=False).to(F64)
    odd.load_state_dict(net.state_dict())
    folded, report = fold_batchnorm_with_report(odd.eval(), by_name=True, check_input=x)
    assert report.entries[0].notes == ["its input is not the output of a Linear/Conv module"]
    torch.testing.assert_close(folded(x), net(x))
    # Neither traced nor run: names only when asked, and the report says it assumed.
    kept, report = fold_batchnorm_with_report(odd)
    assert isinstance(kept.bn, nn.BatchNorm2d) and "torch.fx could not trace" in str(report)
    guessed, report = fold_batchnorm_with_report(odd, by_name=True)
    assert isinstance(guessed.bn, nn.Identity)
    assert "paired by name" in report.entries[0].notes[0]


# --------------------------------------------------------------------------------------
# freeze_batchnorm
# --------------------------------------------------------------------------------------


def test_freeze_batchnorm_survives_train_and_unfreezes():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), BatchRenorm2d(2), nn.LayerNorm(4))
    freeze_batchnorm(net)
    net.train()  # what torch users call every epoch
    before = _state(net)
    out = net[:2](torch.randn(8, 3) * 5 + 3)
    net[2](torch.randn(4, 2, 3, 3))
    assert not net[1].training and not net[2].training
    for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(net.state_dict()[k], before[k])
    out.sum().backward()
    assert net[1].weight.grad is None and net[0].weight.grad is not None
    assert net[3].weight.requires_grad  # not a BatchNorm: untouched
    frozen_copy = copy.deepcopy(net)
    frozen_copy.train()
    frozen_copy[:2](torch.randn(8, 3))
    assert not frozen_copy[1].training  # the freeze travels with deepcopy
    unfreeze_batchnorm(net)
    assert net[1].training and net[1].weight.requires_grad
    net[:2](torch.randn(8, 3) + 7)
    assert int(net[1].num_batches_tracked) == 1
