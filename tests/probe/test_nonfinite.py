"""Non-finite values in a record: counted per unit, never averaged into a finite number,
never a numpy warning; finite values too large for float32 squares measured right."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from covshift.probe.record_summary import StatsConfig, saturation_stats, summarize, to_host
from covshift.probe.shift_metrics import compare, shift_series
from covshift.probe.stats import Moments

CONFIG = StatsConfig(quantiles=(0.1, 0.5, 0.9), bins=8, unit_histograms=True, pooled_quantiles=True)


@pytest.fixture(autouse=True)
def _warnings_are_errors() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning anywhere fails the test
        yield


def _record(x: torch.Tensor, activation: str | None = "tanh") -> dict[str, np.ndarray]:
    return to_host({"layer": summarize(x, CONFIG, activation=activation)})["layer"]


def test_units_with_inf_or_nan_are_counted_and_not_measured() -> None:
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    x[3, 1] = float("inf")
    x[7, 2] = float("nan")
    x[9, 4] = -float("inf")
    host = _record(x)
    good = [0, 3]
    v = x[:, good].double().numpy()
    assert host["nonfinite_units"] == 3 and host["nonfinite_units"].dtype == np.int64
    for key in ("mean", "std", "saturation"):
        assert np.isnan(host[key][[1, 2, 4]]).all(), key
    assert np.isnan(host["quantiles"][:, [1, 2, 4]]).all()
    # The finite units keep the numbers of their own values.
    np.testing.assert_allclose(host["mean"][good], v.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(host["std"][good], v.std(0), rtol=1e-5)
    np.testing.assert_allclose(
        host["quantiles"][:, good], np.quantile(v, [0.1, 0.5, 0.9], axis=0), rtol=1e-5
    )
    # Pooled figures over all units cannot be had: NaN, not the finite units' figure.
    for key in ("pooled_mean", "pooled_std", "pooled_quantiles", "pooled_saturation"):
        assert np.isnan(host[key]).all(), key
    # The histogram counts the finite units' values, in edges spanning exactly them.
    assert host["hist_edges"][0] == pytest.approx(v.min()) and np.isfinite(host["hist_edges"]).all()
    assert host["hist_edges"][-1] == pytest.approx(v.max())
    np.testing.assert_array_equal(host["hist"], np.histogram(v, bins=host["hist_edges"])[0])
    assert (host["unit_hist"][[1, 2, 4]] == 0).all() and host["hist"].sum() == v.size
    assert host["count"] == 200


def test_a_finite_record_counts_zero_non_finite_units() -> None:
    host = _record(torch.randn(50, 4))
    assert host["nonfinite_units"] == 0 and np.isfinite(host["pooled_std"])


def test_a_record_without_any_finite_unit() -> None:
    x = torch.full((30, 3), float("nan"))
    x[0, 0] = float("inf")
    host = _record(x)
    assert host["nonfinite_units"] == 3
    assert np.isnan(host["hist_edges"]).all() and host["hist"].sum() == 0
    assert np.isnan(host["mean"]).all() and np.isnan(host["quantiles"]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_values_past_float32_squares_get_their_true_std(dtype: torch.dtype) -> None:
    # A diverging network's activations: finite, but their float32 squares overflow.
    x = (torch.randn(300, 3, generator=torch.Generator().manual_seed(1)) * 1e25).to(dtype)
    x[:, 1] /= 1e25  # an ordinary unit beside them
    ref = x.double().numpy()
    m = Moments.of(x)
    np.testing.assert_allclose(m.mean.numpy(), ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(m.std.numpy(), ref.std(0), rtol=1e-6)
    host = _record(x)
    assert host["nonfinite_units"] == 0
    np.testing.assert_allclose(host["std"], ref.std(0), rtol=1e-5)
    assert np.isfinite(host["pooled_std"])


def test_huge_values_through_the_device_path_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # The torch path (what CUDA runs) recomputes overflowed rows in float64 as well.
    from covshift.probe import stats

    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(2)) * 1e22
    x[5, 3] = float("inf")
    cpu_mean, cpu_m2 = stats.row_mean_m2(x.t().contiguous())
    monkeypatch.setattr(stats, "_numpy_ok", lambda rows: False)
    mean, m2 = stats.row_mean_m2(x.t().contiguous())
    ref = x[:, :3].double().numpy()
    np.testing.assert_allclose(m2[:3].numpy(), ((ref - ref.mean(0)) ** 2).sum(0), rtol=1e-6)
    np.testing.assert_allclose(m2[:3].numpy(), cpu_m2[:3].numpy(), rtol=1e-6)
    assert not torch.isfinite(mean[3]) and not torch.isfinite(cpu_mean[3])


def test_saturation_of_a_feed_with_non_finite_values() -> None:
    x = torch.randn(100, 3) * 4
    x[0, 2] = float("nan")
    host = to_host({"l": saturation_stats(x, "tanh", CONFIG)})["l"]
    assert np.isnan(host["saturation"][2]) and np.isfinite(host["saturation"][:2]).all()
    assert np.isnan(host["pooled_saturation"])


def test_shift_metrics_of_non_finite_records_are_nan_not_an_error() -> None:
    finite = _record(torch.randn(100, 3))
    broken = _record(torch.full((100, 3), float("inf")))
    shift = compare(finite, broken)
    assert all(np.isnan(v) for v in shift.layer.values()), shift.layer
    series = {k: np.stack([finite[k], broken[k]]) for k in finite}
    out = shift_series(series)
    assert out["hist_w1"][0] == 0.0 and np.isnan(out["hist_w1"][1])
    assert np.isnan(out["mean_shift"][1])
