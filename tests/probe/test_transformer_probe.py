"""ShiftProbe on the language model: ``"auto"`` finds every norm and the MLP's
activation; units are the features (last axis of ``(N, T, C)``), tokens pooled as
samples, checked against the tensors a plain forward hook captures, reshaped here
with the axis written down (not asked of the library)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from covshift.models import build_transformer
from covshift.probe import ShiftProbe

LEVELS = (0.15, 0.5, 0.85)


def features(t: torch.Tensor) -> np.ndarray:
    """(B * T, C): every token of ``(B, T, C)`` values as a sample of the C features."""
    a = t.detach().double().numpy()
    return a.reshape(-1, a.shape[-1])


def captured(model: torch.nn.Module, names: list[str], x: torch.Tensor, side: str) -> dict:
    """The input (or output) of each named module in one eval forward, by plain hooks."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(
            lambda _m, args, out, n=n: seen.__setitem__(n, args[0] if side == "input" else out)
        )
        for n in names
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    model.train()
    return seen


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("norm", ["layer", "rms", "batch"])
def test_auto_finds_each_norm_and_the_mlp_activation(norm: str, placement: str) -> None:
    net = build_transformer(
        context=16, d_model=24, n_layer=3, n_head=2, norm=norm, placement=placement
    )
    probe = ShiftProbe(net, "auto", torch.randint(0, 256, (4, 16)), every=1)
    expected = [f"blocks.{i}.{m}" for i in range(3) for m in ("ln_1", "ln_2", "mlp.act")]
    if placement == "pre":
        expected.append("ln_f")
    assert list(probe.layer_names) == expected
    norm_only = ShiftProbe(net, "auto:norm", torch.randint(0, 256, (4, 16)), every=1)
    assert [n for n in norm_only.layer_names if "act" in n] == []


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("norm", ["layer", "rms", "batch"])
def test_units_are_the_features_with_tokens_pooled(norm: str, side: str) -> None:
    # context == d_model == 32: the shape alone cannot tell the axes apart
    net = build_transformer(context=32, d_model=32, n_layer=2, n_head=4, norm=norm)
    x = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    if norm == "batch":  # running statistics that have seen a batch: the eval forward
        with torch.no_grad():  # (untouched ones are probed with batch statistics)
            net.train()
            net(torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no axis may be assumed or in doubt
        probe = ShiftProbe(net, "auto", x, every=1, record=side, quantiles=LEVELS)
        with probe:
            probe.maybe_record(0)
    records = {r.layer: r for r in probe.records}
    names = list(records)
    seen = captured(net, names, x, side)
    assert set(names) == {
        "blocks.0.ln_1",
        "blocks.0.ln_2",
        "blocks.0.mlp.act",
        "blocks.1.ln_1",
        "blocks.1.ln_2",
        "blocks.1.mlp.act",
        "ln_f",
    }
    for name, record in records.items():
        values = features(seen[name])  # (6 * 32, C)
        assert record.unit_axis is not None and record.unit_axis.dim == 2, record.unit_axis
        assert record.unit_axis.source in ("layer", "producer") and not record.unit_axis.doubt
        s = record.stats
        assert int(s["count"]) == 6 * 32 and s["mean"].shape == (values.shape[1],)
        np.testing.assert_allclose(s["mean"], values.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["std"], values.std(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            s["quantiles"], np.quantile(values, LEVELS, axis=0), rtol=1e-5, atol=1e-6
        )
    assert records["blocks.0.mlp.act"].stats["mean"].shape == (128,)  # the MLP's width
