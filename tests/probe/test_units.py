"""Units per layer: the probe's units are the model's features, whatever the layout.

Every check compares the record with an independent computation (numpy over the
tensor a plain hook captured, with the axis written down here, not asked of the
library): MLP, CNN, a (N, T, C) sequence model, a ConvNeXt-style model mixing
channels-first convolutions and norms with channels-last LayerNorm and Linear
layers, a GPT-2-style MLP of transformers' ``Conv1D`` (``nf``, weight ``(nx, nf)``),
activations after Linear layers; plus the overrides, the warnings, and the store.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.callbacks import StoreRecorder
from covshift.probe import ShiftProbe
from covshift.probe.units import UnitAxisWarning, UnitPolicy, layer_claim
from covshift.store import Store

LEVELS = (0.15, 0.5, 0.85)


def unit_values(t: torch.Tensor, axis: int) -> np.ndarray:
    """(M, U): the values of each unit along ``axis``, rows over every other axis."""
    a = t.detach().double().numpy()
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def check(record, values: np.ndarray) -> None:
    """The record describes exactly the columns of ``values`` (M, U)."""
    s = record.stats
    assert s["mean"].shape == (values.shape[1],), (record.layer, s["mean"].shape)
    assert int(s["count"]) == values.shape[0]
    np.testing.assert_allclose(s["mean"], values.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["std"], values.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        s["quantiles"], np.quantile(values, LEVELS, axis=0), rtol=1e-5, atol=1e-6
    )


class Seen:
    """Every tensor the modules of ``model`` receive (or return), by name."""

    def __init__(self, model: nn.Module, output: bool = False) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, module in model.named_modules():
            if not name:
                continue
            if output:
                hook = self._out(name)
                self.handles.append(module.register_forward_hook(hook))
            else:
                self.handles.append(module.register_forward_pre_hook(self._in(name)))

    def _in(self, name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                self.values.setdefault(name, args[0].detach().clone())

        return hook

    def _out(self, name):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, torch.Tensor):
                self.values.setdefault(name, out.detach().clone())

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def records_and_values(model, layers, x, expected_axes, record="input", **kw):
    """Probe ``model``, capture the same tensors by hand, and check every layer's
    record against numpy over ``expected_axes[layer]``; return the records."""
    with torch.no_grad():
        # One training forward first: the norms' running statistics then have seen a
        # batch, and the eval-mode record uses them (records of untrained norms are
        # tested in test_norm_stats.py).
        model.train()
        model(x)
        model.eval()
        seen = Seen(model, output=record == "output")
        model(x)
        seen.close()
    recs = {r.layer: r for r in ShiftProbe(model, layers, x, record=record, **kw).record_now(0)}
    assert set(recs) == set(expected_axes), sorted(recs)
    for name, axis in expected_axes.items():
        rec = recs[name]
        assert rec.unit_axis is not None and rec.unit_axis.dim == axis, (name, rec.unit_axis)
        assert rec.unit_axis.size == seen.values[name].shape[axis]
        check(rec, unit_values(seen.values[name], axis))
    return recs


# -- MLP, CNN ---------------------------------------------------------------------------


def test_mlp_units_are_features() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(40, 6)
    recs = records_and_values(net, ["auto", "auto:linear"], x, {"0": 1, "1": 1, "2": 1, "3": 1})
    assert recs["0"].unit_axis.source == "layer"
    assert "in_features=6" in recs["0"].unit_axis.rule
    assert "BatchNorm1d.num_features=5" in recs["1"].unit_axis.rule
    assert recs["2"].unit_axis.source == "producer" and "'1'" in recs["2"].unit_axis.rule


def test_cnn_units_are_channels() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.GroupNorm(2, 6),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    )
    x = torch.randn(5, 3, 9, 9)
    axes = {"0": 1, "1": 1, "2": 1, "3": 1, "4": 1, "5": 1, "8": 1}
    recs = records_and_values(net, ["auto", "auto:linear"], x, axes)
    assert "Conv2d.in_channels=3" in recs["0"].unit_axis.rule
    assert recs["5"].unit_axis.source == "producer"
    records_and_values(net, ["auto", "auto:linear"], x, axes, record="output")


# -- sequences: the units are the features, not the token positions -----------------------


class SeqModel(nn.Module):
    """(N, T, C) values: LayerNorm, Linear, GELU, Linear, like a transformer MLP."""

    def __init__(self, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, C)
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


@pytest.mark.parametrize("record", ["input", "output"])
@pytest.mark.parametrize("tokens", [5, 8, 12])  # also T == C (8) and T == hidden (12)
def test_sequence_units_are_features(record: str, tokens: int) -> None:
    torch.manual_seed(0)
    net = SeqModel()
    x = torch.randn(3, tokens, 8)
    axes = {"norm": 2, "fc1": 2, "act": 2, "fc2": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnitAxisWarning)  # nothing here is in doubt
        recs = records_and_values(net, ["auto", "auto:linear"], x, axes, record=record)
    assert recs["norm"].stats["mean"].shape == (8,)  # features, not token positions
    assert recs["act"].unit_axis.source == "producer"
    assert "'fc1'" in recs["act"].unit_axis.rule
    assert "normalized_shape=(8,)" in recs["norm"].unit_axis.rule


def test_activation_of_a_4d_channels_last_tensor_follows_its_linear() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Dropout(0.1), nn.Tanh())
    x = torch.randn(2, 5, 6, 3)  # (N, H, W, C)
    recs = records_and_values(net, ["1", "3"], x, {"1": 3, "3": 3})
    assert recs["3"].unit_axis.source == "producer"  # through ReLU and Dropout: still '0'
    assert "'0'" in recs["3"].unit_axis.rule


# -- ConvNeXt: channels-first and channels-last layers in one model ----------------------


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: a LayerNorm subclass over C of (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNextLayerNorm(nn.Module):
    """transformers' ConvNeXt LayerNorm: one class, ``data_format`` says the layout."""

    def __init__(self, dim: int, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.bias = nn.Parameter(torch.randn(dim))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = norm(dim)  # channels last, on (N, H, W, C)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        h = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Stem conv + channels-first norm, a block, channels-first norm + downsample conv,
    a block, pooled head: the layouts of timm's and transformers' ConvNeXt."""

    def __init__(self, hf: bool = False, dims=(8, 16)) -> None:
        super().__init__()
        if hf:
            first = lambda c: ConvNextLayerNorm(c, data_format="channels_first")  # noqa: E731
            last = lambda c: ConvNextLayerNorm(c, data_format="channels_last")  # noqa: E731
        else:
            first, last = LayerNorm2d, nn.LayerNorm
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 2, stride=2), first(dims[0]))
        self.stage0 = ConvNeXtBlock(dims[0], last)
        self.down = nn.Sequential(first(dims[0]), nn.Conv2d(dims[0], dims[1], 2, stride=2))
        self.stage1 = ConvNeXtBlock(dims[1], last)
        self.head_norm = nn.LayerNorm(dims[1])
        self.head = nn.Linear(dims[1], 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.down(self.stage0(self.stem(x))))
        return self.head(self.head_norm(x.mean((2, 3))))


CONVNEXT_AXES = {
    "stem.0": 1,
    "stem.1": 1,
    "stage0.dwconv": 1,
    "stage0.norm": 3,
    "stage0.pwconv1": 3,
    "stage0.act": 3,
    "stage0.pwconv2": 3,
    "down.0": 1,
    "down.1": 1,
    "stage1.dwconv": 1,
    "stage1.norm": 3,
    "stage1.pwconv1": 3,
    "stage1.act": 3,
    "stage1.pwconv2": 3,
    "head_norm": 1,
    "head": 1,
}


@pytest.mark.parametrize("hf", [False, True], ids=["timm", "transformers"])
@pytest.mark.parametrize("record", ["input", "output"])
@pytest.mark.parametrize("size", [20, 16])  # 16: stage 0 is 8 x 8 with 8 channels
def test_convnext_mixes_channels_first_and_last(hf: bool, record: str, size: int) -> None:
    torch.manual_seed(0)
    net = ConvNeXt(hf=hf)
    x = torch.randn(3, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnitAxisWarning)
        recs = records_and_values(net, ["auto", "auto:linear"], x, CONVNEXT_AXES, record=record)
    assert recs["stage0.norm"].stats["mean"].shape == (8,)
    assert recs["stage1.act"].stats["mean"].shape == (64,)
    if hf:
        assert "channels_first" in recs["stem.1"].unit_axis.rule
        assert "channels_last" in recs["stage0.norm"].unit_axis.rule
    else:
        assert "LayerNorm2d" in recs["stem.1"].unit_axis.rule


def test_convnext_channels_first_norm_whose_width_equals_its_channels() -> None:
    # 16 x 16 maps with 16 channels: the size alone cannot tell; the class says.
    torch.manual_seed(0)
    norm = LayerNorm2d(16)
    x = torch.randn(4, 16, 16, 16)
    (rec,) = ShiftProbe(nn.Sequential(norm), "auto", x).record_now(0)
    assert rec.unit_axis.dim == 1
    check(rec, unit_values(x, 1))


def test_a_channels_first_norm_that_does_not_say_so_is_found_by_its_size() -> None:
    class Custom(nn.LayerNorm):  # no data_format, no ...2d name: claims the last axis
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return LayerNorm2d.forward(self, x)  # type: ignore[arg-type]

    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 7)
    net = nn.Sequential(Custom(6))
    with pytest.warns(UnitAxisWarning, match="the only axis of size 6 is 1"):
        (rec,) = ShiftProbe(net, "auto", x).record_now(0)
    assert rec.unit_axis.dim == 1 and rec.unit_axis.source == "layer"
    check(rec, unit_values(x, 1))
    # When the last axis has the same size too, the doubt is said and warned about.
    square = torch.randn(4, 6, 5, 6)
    with pytest.warns(UnitAxisWarning, match="axis 1 has the same size"):
        (rec,) = ShiftProbe(net, "auto", square).record_now(0)
    assert "axis 1 has the same size" in rec.unit_axis.rule
    # ... and a per-layer axis settles it.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnitAxisWarning)
        (rec,) = ShiftProbe(net, "auto", square, unit_dim={"0": 1}).record_now(0)
    assert rec.unit_axis.dim == 1 and rec.unit_axis.source == "given"
    check(rec, unit_values(square, 1))


# -- GPT-2: transformers' Conv1D --------------------------------------------------------


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: a Linear with a transposed weight (nx, nf)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class NewGELUActivation(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x.pow(3))))


class GPT2MLP(nn.Module):
    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.ln_2 = nn.LayerNorm(dim)
        self.c_fc = Conv1D(4 * dim, dim)
        self.act = NewGELUActivation()
        self.c_proj = Conv1D(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c_proj(self.act(self.c_fc(self.ln_2(x))))


@pytest.mark.parametrize("record", ["input", "output"])
def test_gpt2_conv1d_units_are_its_features(record: str) -> None:
    torch.manual_seed(0)
    net = GPT2MLP()
    x = torch.randn(3, 4, 6)  # T = 4 = ... nothing in common with 6 or 24
    axes = {"ln_2": 2, "c_fc": 2, "act": 2, "c_proj": 2}
    recs = records_and_values(net, ["auto", "c_fc", "c_proj"], x, axes, record=record)
    nf = "Conv1D.nf=24" if record == "output" else "Conv1D.weight (nx=6, nf=24)"
    assert nf in recs["c_fc"].unit_axis.rule
    assert recs["act"].unit_axis.source == "producer" and "'c_fc'" in recs["act"].unit_axis.rule
    claim = layer_claim(net.c_fc, "output")
    assert claim is not None and (claim.dim, claim.size) == (-1, 24)


# -- layers that say nothing ------------------------------------------------------------


class Scale(nn.Module):
    """A custom elementwise module: no features of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_custom_module_follows_its_producer_and_the_rule_says_so() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 9), Scale(), nn.ReLU())
    x = torch.randn(2, 5, 4)
    recs = records_and_values(net, ["1", "2"], x, {"1": 2, "2": 2})
    assert recs["1"].unit_axis.source == "producer" and "'0'" in recs["1"].unit_axis.rule
    assert recs["2"].unit_axis.source == "producer"  # through Scale: a leaf keeping the shape


class AfterSum(nn.Module):
    """A residual block whose activation receives a functional sum (timm ResNet)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)) + x)


def test_activation_after_a_sum_assumes_the_last_layer_of_that_shape_and_warns() -> None:
    torch.manual_seed(0)
    net = AfterSum()
    x = torch.randn(3, 4, 6, 5)
    with pytest.warns(UnitAxisWarning, match="'act'"):
        recs = records_and_values(net, ["act"], x, {"act": 1})
    axis = recs["act"].unit_axis
    assert axis.source == "assumed" and axis.rule.startswith("as 'bn' (BatchNorm2d")
    assert str(axis).startswith("axis 1 (assumed: as 'bn'")


def test_nothing_known_falls_back_to_axis_1_and_says_so() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6)
    net = nn.Sequential(nn.Tanh())  # the model's input: no producer, no layer before it
    with pytest.warns(UnitAxisWarning, match="assumed the default, axis 1"):
        (rec,) = ShiftProbe(net, "auto", x).record_now(0)
    assert rec.unit_axis.dim == 1 and rec.unit_axis.source == "assumed"
    check(rec, unit_values(x, 1))
    # (N, F) values have one axis: nothing to assume, nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnitAxisWarning)
        (rec,) = ShiftProbe(net, "auto", torch.randn(5, 3)).record_now(0)
    assert rec.unit_axis.source == "only" and rec.unit_axis.dim == 1


def test_the_warning_comes_once_per_layer() -> None:
    net = nn.Sequential(nn.Tanh())
    probe = ShiftProbe(net, "auto", torch.randn(3, 4, 6), every=1, background=False)
    with pytest.warns(UnitAxisWarning):
        probe.maybe_record(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnitAxisWarning)
        probe.maybe_record(1)
    assert probe.unit_axes["0"].dim == 1


# -- what the user gives ----------------------------------------------------------------


def test_an_int_is_every_layer_axis_as_before() -> None:
    torch.manual_seed(0)
    net = SeqModel()
    x = torch.randn(3, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnitAxisWarning)  # -1 agrees with every layer
        recs = records_and_values(
            net,
            ["auto", "auto:linear"],
            x,
            dict.fromkeys(["norm", "fc1", "act", "fc2"], 2),
            unit_dim=-1,
        )
    assert all(r.unit_axis.source == "given" for r in recs.values())


def test_a_given_axis_that_contradicts_the_layer_wins_and_is_warned_about() -> None:
    torch.manual_seed(0)
    net = SeqModel()
    x = torch.randn(3, 5, 8)
    with pytest.warns(UnitAxisWarning) as caught:
        recs = records_and_values(net, ["norm", "act"], x, {"norm": 1, "act": 1}, unit_dim=1)
    text = str(caught[0].message)
    assert "'norm'" in text and "'act'" in text  # the activation's producer says -1 too
    assert "the layer says otherwise" in recs["norm"].unit_axis.rule
    assert recs["norm"].unit_axis.source == "given"


def test_per_layer_axes_by_pattern_first_match_wins() -> None:
    torch.manual_seed(0)
    net = ConvNeXt()
    x = torch.randn(2, 3, 20, 20)
    axes = dict(CONVNEXT_AXES)
    axes["stage0.norm"] = 2  # a (deliberately odd) override: axis 2 of (N, H, W, C)
    given = {"stage0.norm": 2, "stage*.**": "auto", "**": 1}
    with pytest.warns(UnitAxisWarning, match="'stage0.norm'"):
        recs = records_and_values(net, ["auto", "auto:linear"], x, axes, unit_dim=given)
    assert recs["stage0.norm"].unit_axis.source == "given"
    assert recs["stage1.norm"].unit_axis.source == "layer"  # "auto" by the second pattern
    assert recs["stem.0"].unit_axis.source == "given"  # "**": 1 (agrees with the conv)
    assert "unit_dim['**']=1" in recs["stem.0"].unit_axis.rule


@pytest.mark.parametrize(
    ("unit_dim", "error", "match"),
    [
        (0, ValueError, "batch axis"),
        ("last", ValueError, "'auto'"),
        (1.5, TypeError, "must be an axis"),
        (True, TypeError, "must be an axis"),
        ({"fc*": 0}, ValueError, r"unit_dim\['fc\*'\] must not be 0"),
        ({"nope.*": 1}, ValueError, "matches none of the watched layers"),
    ],
)
def test_bad_unit_dims_are_refused(unit_dim, error, match) -> None:
    with pytest.raises(error, match=match):
        ShiftProbe(SeqModel(), "auto", torch.randn(2, 3, 8), unit_dim=unit_dim)


def test_a_given_axis_the_tensor_lacks_is_an_error() -> None:
    probe = ShiftProbe(SeqModel(), "norm", torch.randn(2, 3, 8), unit_dim=3)
    with pytest.raises(ValueError, match=r"unit_dim=3 does not fit the input of layer 'norm'"):
        probe.record_now(0)


def test_policy_lookup() -> None:
    policy = UnitPolicy.of({"blocks.*.norm": -1, "blocks.**": "auto", "**": 1})
    assert policy.given("blocks.0.norm") == (-1, "unit_dim['blocks.*.norm']=-1")
    assert policy.given("blocks.0.norm#1") == (-1, "unit_dim['blocks.*.norm']=-1")
    assert policy.given("blocks.0.mlp.act") is None
    assert policy.given("stem") == (1, "unit_dim['**']=1")
    assert UnitPolicy.of("auto").given("x") is None


# -- the ways of recording agree ----------------------------------------------------------


def test_background_and_live_records_carry_the_same_axes() -> None:
    torch.manual_seed(0)
    net = ConvNeXt()
    x = torch.randn(2, 3, 20, 20)
    sync = ShiftProbe(net, "auto", x, every=1, background=False)
    back = ShiftProbe(net, "auto", x, every=1, background=True)
    with sync, back:
        for step in (0, 1):
            sync.maybe_record(step)
            back.maybe_record(step)
        back.flush()
    assert [r.unit_axis for r in back.records] == [r.unit_axis for r in sync.records]
    for a, b in zip(back.records, sync.records, strict=True):
        np.testing.assert_array_equal(a.stats["mean"], b.stats["mean"])
    live = ShiftProbe(net, "auto", source="train", every=1)
    net.train()
    with live:
        live.maybe_record(0)
        net(x).sum().backward()
        live.maybe_record(1)
    assert {r.layer: r.unit_axis.dim for r in live.records} == {
        r.layer: r.unit_axis.dim for r in sync.records if r.step == 0
    }


# -- the store --------------------------------------------------------------------------


def test_records_tell_the_store_their_axis(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ConvNeXt()
    with Store(tmp_path / "c.db") as store:
        run = store.start_run("units", config={})
        sink = StoreRecorder(store, run).probe_sink
        probe = ShiftProbe(net, "auto", torch.randn(2, 3, 20, 20), steps=[0, 5], sink=sink)
        with probe:
            probe.maybe_record(0)
            probe.maybe_record(5)
        units = store.probe_units(run, "stage0.norm")
        assert [u.step for u in units] == [0, 5]
        assert {(u.dim, u.source) for u in units} == {(3, "layer")}
        assert "normalized_shape=(8,)" in (units[0].rule or "")
        assert store.probe_units(run, "stage0.act")[0].source == "producer"
