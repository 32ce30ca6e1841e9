"""Statistics of one record against direct NumPy computations on the same values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from covshift.probe import stats as stats_mod
from covshift.probe.record_summary import StatsConfig, saturation_stats, summarize, to_host
from covshift.probe.saturation import activation_kind, saturated, tail_threshold
from covshift.probe.stats import (
    Moments,
    histogram_edges,
    sorted_histogram,
    sorted_saturated,
    unit_histogram,
    unit_quantiles,
    unit_rows,
    unit_view,
)


def test_unit_view_axes() -> None:
    x = torch.randn(3, 4, 5, 6)
    assert torch.equal(unit_view(x), x.permute(0, 2, 3, 1).reshape(-1, 4))
    tokens = torch.randn(2, 7, 5)  # (N, T, E): units are the E features
    assert torch.equal(unit_view(tokens, -1), tokens.reshape(-1, 5))
    with pytest.raises(ValueError, match="batch axis"):
        unit_view(tokens, 0)
    with pytest.raises(ValueError, match=r"\(N, C, ...\)"):
        unit_view(torch.randn(5))


def test_moments_chunked_and_merged_match_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of 7 values per unit force the Chan merge inside one record.
    monkeypatch.setattr(stats_mod, "_CHUNK_ROWS", 7)
    x = torch.randn(50, 3, dtype=torch.float32) * torch.tensor([1.0, 10.0, 1e-3]) + 1e3
    m = Moments.of(x)
    ref = x.double().numpy()
    np.testing.assert_allclose(m.mean.numpy(), ref.mean(0), rtol=1e-12)
    # Squares of float32 deviations, summed in float64: float32 product precision.
    np.testing.assert_allclose(m.var.numpy(), ref.var(0), rtol=1e-6)
    assert m.count.item() == 50 and m.mean.dtype == torch.float64
    # Merging the summaries of two batches = the summary of their concatenation.
    a, b = Moments.of(x[:13]), Moments.of(x[13:])
    merged = a.merge(b)
    np.testing.assert_allclose(merged.var.numpy(), ref.var(0), rtol=1e-6)
    pooled = m.pooled()
    assert pooled.mean.item() == pytest.approx(ref.mean(), rel=1e-12)
    assert pooled.var.item() == pytest.approx(ref.var(), rel=1e-6)
    # float64 values: float64 throughout.
    np.testing.assert_allclose(Moments.of(x.double()).var.numpy(), ref.var(0), rtol=1e-9)


def test_moments_accumulate_in_float64() -> None:
    # A float32 running sum of 2**24 + 1 ones stalls at 2**24; float64 does not.
    x = torch.ones(2**24 + 2, 1)
    x[-1] = 3.0
    m = Moments.of(x)
    assert m.mean.item() == pytest.approx((2**24 + 1 + 3.0) / (2**24 + 2), rel=1e-15)
    assert m.m2.item() == pytest.approx(4.0 * (2**24 + 1) / (2**24 + 2), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 60),
    levels=st.lists(st.floats(0, 1), min_size=1, max_size=6).map(sorted),
    seed=st.integers(0, 1000),
)
def test_quantiles_match_numpy(m: int, levels: list[float], seed: int) -> None:
    x = torch.randn(m, 3, generator=torch.Generator().manual_seed(seed))
    got = unit_quantiles(x, levels).numpy()
    np.testing.assert_allclose(got, np.quantile(x.numpy(), levels, axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bins", [1, 7, 40])
def test_histogram_matches_numpy_with_the_recorded_edges(bins: int) -> None:
    x = torch.randn(997, 5) * torch.tensor([1.0, 2.0, 0.1, 5.0, 1.0])
    x[0, 0] = x.max()  # the maximum is counted in the last bin
    lo, hi = torch.aminmax(x)
    edges = histogram_edges(lo, hi, bins, x.dtype)
    assert edges[0] == lo and edges[-1] == hi
    counts = unit_histogram(x, edges)
    np.testing.assert_array_equal(unit_histogram(x, edges, per_unit=False), counts.sum(0))
    e = edges.double().numpy()
    for u in range(5):
        np.testing.assert_array_equal(counts[u].numpy(), np.histogram(x[:, u].numpy(), bins=e)[0])
    assert counts.sum() == x.numel()
    # The edges are equal width to float32 precision (numpy.histogram's range= form).
    np.testing.assert_allclose(e, np.linspace(lo.item(), hi.item(), bins + 1), rtol=1e-6, atol=1e-6)


def test_histogram_of_a_constant_tensor() -> None:
    x = torch.full((10, 2), 3.0)
    edges = histogram_edges(*torch.aminmax(x), 4, x.dtype)
    assert edges[0] == 2.5 and edges[-1] == 3.5
    assert unit_histogram(x, edges).sum(1).tolist() == [10, 10]


def test_saturation_thresholds_and_fractions() -> None:
    r = 0.05
    t_sig, t_tanh = tail_threshold("sigmoid", r), tail_threshold("tanh", r)
    # At the threshold the slope is exactly r times the peak slope.
    s = 1 / (1 + np.exp(-t_sig))
    assert s * (1 - s) / 0.25 == pytest.approx(r)
    assert (1 - np.tanh(t_tanh) ** 2) == pytest.approx(r)
    x = torch.randn(300, 4) * 4
    v = x.numpy()
    np.testing.assert_array_equal(saturated(x, "sigmoid", r).numpy(), (np.abs(v) > t_sig).sum(0))
    np.testing.assert_array_equal(saturated(x, "tanh", r).numpy(), (np.abs(v) > t_tanh).sum(0))
    np.testing.assert_array_equal(saturated(x, "relu", r).numpy(), (v < 0).sum(0))
    assert activation_kind(torch.nn.LeakyReLU()) == "relu"
    assert activation_kind(torch.nn.GELU()) is None
    with pytest.raises(ValueError, match="fraction in"):
        tail_threshold("tanh", 1.5)


def test_summary_keys_and_host_transfer() -> None:
    x = torch.randn(64, 3, 4, 4)  # (N, C, H, W): units are the 3 channels
    config = StatsConfig(
        quantiles=(0.1, 0.5, 0.9), bins=8, unit_histograms=True, pooled_quantiles=True
    )
    device = summarize(x, config)
    device.update(saturation_stats(x, "relu", config))
    host = to_host({"layer": device})["layer"]
    v = x.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    assert host["count"] == 64 * 16 and host["count"].dtype == np.int64
    np.testing.assert_allclose(host["mean"], v.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(host["std"], v.std(0), rtol=1e-5)
    np.testing.assert_allclose(host["pooled_mean"], v.mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(host["pooled_std"], v.std(), rtol=1e-5)
    np.testing.assert_allclose(
        host["quantiles"], np.quantile(v, [0.1, 0.5, 0.9], axis=0), rtol=1e-5
    )
    np.testing.assert_allclose(
        host["pooled_quantiles"], np.quantile(v, [0.1, 0.5, 0.9]), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_array_equal(host["hist"], np.histogram(v, bins=host["hist_edges"])[0])
    assert host["unit_hist"].shape == (3, 8)
    np.testing.assert_array_equal(host["unit_hist"].sum(0), host["hist"])
    np.testing.assert_allclose(host["saturation"], (v < 0).mean(0), rtol=1e-6)
    np.testing.assert_allclose(host["pooled_saturation"], (v < 0).mean(), rtol=1e-6)


def test_to_host_makes_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = torch.Tensor.cpu

    def counting(self: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        calls.append(tuple(self.shape))
        return original(self, *a, **k)

    config = StatsConfig()
    summaries = {f"l{i}": summarize(torch.randn(20, 5), config) for i in range(4)}
    monkeypatch.setattr(torch.Tensor, "cpu", counting)
    host = to_host(summaries)
    assert len(calls) == 1 and len(host) == 4


@pytest.mark.parametrize("kind", ["sigmoid", "tanh", "relu"])
def test_sorted_paths_equal_the_direct_ones(kind: str) -> None:
    """Histogram and saturation by binary search in sorted rows == counting every value."""
    x = torch.randn(8, 3, 5, 5) * 4  # (N, C, H, W)
    x[0, 0, 0, 0] = tail_threshold(kind, 0.05)  # exactly on the threshold: not saturated
    rows = unit_rows(x)
    assert torch.equal(rows, unit_view(x).t())
    ordered = rows.sort(dim=1).values
    np.testing.assert_array_equal(
        sorted_saturated(ordered, kind, 0.05).numpy(), saturated(unit_view(x), kind, 0.05).numpy()
    )
    edges = histogram_edges(ordered[:, 0].min(), ordered[:, -1].max(), 9, x.dtype)
    np.testing.assert_array_equal(
        sorted_histogram(ordered, edges).numpy(), unit_histogram(unit_view(x), edges).numpy()
    )
