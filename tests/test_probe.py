"""The first probe: per-unit quantiles and moments on a fixed batch, the schedule,
hook hygiene, and the drift figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from covshift.models import build_cnn, build_mlp
from covshift.probe import Schedule, ShiftProbe, quantile_drift, unit_view
from covshift.probe.shift_metrics import unit_quantile_drift


def pre_activations(net: nn.Module, x: torch.Tensor, layer: int) -> np.ndarray:
    """The input of ``hidden.<layer>.act`` computed by hand, in eval mode."""
    net.eval()
    with torch.no_grad():
        for block in net.hidden[:layer]:
            x = block(x)
        block = net.hidden[layer]
        h = block.linear(x)
        if hasattr(block, "norm"):
            h = block.norm(h)
    net.train()
    return h.numpy().astype(np.float64)


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_statistics_match_numpy(norm: str) -> None:
    torch.manual_seed(0)
    net = build_mlp(20, 3, width=7, depth=2, norm=norm)
    if norm == "batch":  # give BN non-trivial running statistics
        net(torch.randn(50, 20) * 2 + 1)
    x = torch.randn(101, 20)
    probe = ShiftProbe(net, ["hidden.*.act"], x, every=1, quantiles=(0.15, 0.5, 0.85, 0.99))
    records = {r.layer: r for r in probe.record_now(step=5)}
    assert set(records) == {"hidden.0.act", "hidden.1.act"}
    for i in range(2):
        h = pre_activations(net, x, i)
        stats = records[f"hidden.{i}.act"].stats
        np.testing.assert_allclose(
            stats["quantiles"],
            np.quantile(h, [0.15, 0.5, 0.85, 0.99], axis=0),
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(stats["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["std"], h.std(0), rtol=1e-5, atol=1e-6)
    assert records["hidden.0.act"].step == 5


def test_output_mode_records_the_activation() -> None:
    net = build_mlp(10, 2, width=5, depth=1)
    x = torch.randn(30, 10)
    (record,) = ShiftProbe(net, ["hidden.0.act"], x, record="output").record_now(0)
    expected = torch.sigmoid(torch.from_numpy(pre_activations(net, x, 0))).numpy()
    np.testing.assert_allclose(record.stats["mean"], expected.mean(0), rtol=1e-5)


def test_conv_units_are_channels() -> None:
    net = build_cnn((1, 8, 8), 3, channels=(4,), norm="batch")
    x = torch.randn(6, 64)
    (record,) = ShiftProbe(net, ["features.0.act"], x).record_now(0)
    # The norm has seen no batch: the record normalizes with the batch's own statistics,
    # as a training forward does (docs/probe.md).
    net.train()
    with torch.no_grad():
        block = net.features[0]
        h = block.norm(block.linear(x.view(6, 1, 8, 8)))  # (N, C, H, W)
    values = h.permute(0, 2, 3, 1).reshape(-1, 4).numpy()  # every (n, h, w) of each channel
    np.testing.assert_allclose(
        record.stats["quantiles"][1], np.median(values, axis=0), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(unit_view(h), h.permute(0, 2, 3, 1).reshape(-1, 4))


def test_no_side_effects_and_hooks_removed() -> None:
    net = build_mlp(10, 2, width=6, depth=2, norm="batch")
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    probe = ShiftProbe(net, ["hidden.*.act"], torch.randn(40, 10))
    with probe:
        probe.record_now(0)
        for _, module in net.named_modules():
            assert not module._forward_pre_hooks and not module._forward_hooks
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched
    assert net.training


def test_hooks_removed_when_the_forward_fails() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.Sigmoid()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.act(x)
            raise RuntimeError("boom")

    net = Broken()
    probe = ShiftProbe(net, ["act"], torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="boom"):
        probe.record_now(0)
    assert not net.act._forward_pre_hooks


def test_schedule() -> None:
    every = Schedule(every=100)
    assert [s for s in range(0, 350) if every.due(s)] == [0, 100, 200, 300]
    listed = Schedule(steps=[0, 5, 50])
    assert [s for s in range(60) if listed.due(s)] == [0, 5, 50]
    with pytest.raises(ValueError, match="exactly one of every=k or steps"):
        Schedule()
    with pytest.raises(ValueError, match="positive number of steps"):
        Schedule(every=0)
    with pytest.raises(ValueError, match="non-empty list of steps >= 0"):
        Schedule(steps=[-1])


def test_maybe_record_follows_schedule() -> None:
    net = build_mlp(10, 2, width=4, depth=1)
    probe = ShiftProbe(net, ["hidden.0.act"], torch.randn(8, 10), every=3)
    recorded = [s for s in range(10) if probe.maybe_record(s)]
    probe.flush()  # a background record may still be in flight
    assert recorded == [0, 3, 6, 9] and [r.step for r in probe.records] == recorded


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": ["nothing.*"]}, "layer pattern 'nothing.\\*' matches no module of MLP"),
        (
            {"probe_input": torch.randn(5)},
            r"probe_input must be a batch tensor of shape \(N, ...\)",
        ),
        ({"record": "grad"}, "record must be 'input' or 'output'"),
        ({"quantiles": (0.9, 0.1)}, "quantiles must be increasing levels"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    net = build_mlp(10, 2, width=4, depth=1)
    args = {"layers": ["hidden.0.act"], "probe_input": torch.randn(8, 10), **kwargs}
    with pytest.raises(ValueError, match=message):
        ShiftProbe(net, args.pop("layers"), args.pop("probe_input"), **args)


def test_wrong_probe_batch_shape_is_reported() -> None:
    net = build_mlp(10, 2, width=4, depth=1)
    probe = ShiftProbe(net, ["hidden.0.act"], torch.randn(8, 11))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        probe.record_now(0)
    assert not net.hidden[0].act._forward_pre_hooks


def test_drift_by_hand() -> None:
    # Two units, quantiles (15, 50, 85) at three records.
    q = np.array(
        [
            [[0.0, 10.0], [1.0, 10.0], [2.0, 10.0]],  # record 0
            [[1.0, 10.0], [2.0, 10.0], [3.0, 10.0]],  # record 1
            [[2.0, 8.0], [3.0, 10.0], [4.0, 12.0]],  # record 2: unit 0 shifted, unit 1 widened
        ]
    )
    # unit 0: displacement mean(|2-0|, |3-1|, |4-2|) = 2, width mean(2, 2, 2) = 2 -> 1.0
    # unit 1: displacement mean(2, 0, 2) = 4/3, width mean(0, 0, 4) = 4/3 -> 1.0
    np.testing.assert_allclose(unit_quantile_drift(q), [1.0, 1.0])
    assert quantile_drift(q) == pytest.approx(1.0)
    steady = np.repeat(q[:1], 4, axis=0)
    assert quantile_drift(steady) == 0.0
    with pytest.raises(ValueError, match="records >= 2"):
        quantile_drift(q[:1])
