"""Outputs: the store round trip, TensorBoard event files, and the probe plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from covshift.callbacks import StoreRecorder
from covshift.data import Dataset
from covshift.models import build_mlp
from covshift.probe import (
    GradientICSMonitor,
    ShiftProbe,
    SmoothnessMonitor,
    compare,
)
from covshift.report.probe_plots import (
    colorful_dimension,
    probe_figures,
    rebin_histogram,
    save,
)
from covshift.store import Store
from covshift.training import TrainConfig, train


@pytest.fixture(scope="module")
def probed_run(
    small_data: Dataset, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Store, int, list]:
    """A short run with the probe, gradient ICS and smoothness recorded into a store."""
    store = Store(tmp_path_factory.mktemp("store") / "covshift.db")
    run_id = store.start_run("probe-test", config={}, seed=0)
    recorder = StoreRecorder(store, run_id)
    net = build_mlp(784, 10, width=8, depth=2, norm="batch", seed=0)
    kept: list = []

    def sink(record: object) -> None:
        kept.append(record)
        recorder.probe_sink(record)  # type: ignore[arg-type]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: the autouse one-thread fixture comes later
    probe = ShiftProbe(net, "auto", small_data.x_test[:100], every=4, sink=sink)
    monitors = [
        GradientICSMonitor(every=6, sink=sink),
        SmoothnessMonitor(every=6, points=3, sink=sink),
    ]
    with probe:
        train(
            net,
            small_data,
            TrainConfig(steps=12, batch_size=32, lr=0.2),
            callbacks=[probe, *monitors],
            device="cpu",
        )
    torch.set_num_threads(threads)
    yield store, run_id, kept
    store.close()


def test_records_round_trip_through_the_store(probed_run: tuple[Store, int, list]) -> None:
    store, run_id, kept = probed_run
    layers = store.probe_layers(run_id)
    assert {"hidden.0.norm", "hidden.1.act", "hidden.0.linear", "(model)"} <= set(layers)
    act = [r for r in kept if r.layer == "hidden.1.act"]
    steps, quantiles = store.probe(run_id, "hidden.1.act", "quantiles")
    assert steps.tolist() == [0, 4, 8, 12] == [r.step for r in act]
    np.testing.assert_array_equal(quantiles[-1], act[-1].stats["quantiles"])
    _, hist = store.probe(run_id, "hidden.1.act", "hist")
    assert hist.dtype == np.int64 and hist.sum(axis=1).tolist() == [100 * 8] * 4
    _, cos = store.probe(run_id, "hidden.1.linear", "grad_ics_cos")
    assert cos.size == 3 and np.all(np.abs(cos) <= 1 + 1e-9)  # 0-d stats come back as (R, 1)


def test_probe_plots(probed_run: tuple[Store, int, list], tmp_path: Path) -> None:
    store, run_id, _ = probed_run
    paths = probe_figures(store, run_id, tmp_path)
    names = {p.name for p in paths}
    for stem in [
        "layer00-percentiles",
        "layer00-colorful",
        "shift-kl",
        "gradient-ics",
        "smoothness",
    ]:
        assert f"{stem}.png" in names and f"{stem}.svg" in names
    assert all(p.stat().st_size > 1000 for p in paths)
    png = (tmp_path / "shift-kl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_rebin_histogram_against_numpy() -> None:
    values = np.random.default_rng(0).uniform(0, 4, 10_000)
    counts, edges = np.histogram(values, bins=4, range=(0, 4))
    fine = rebin_histogram(counts, edges, np.linspace(0, 4, 9))  # halves of each bin
    np.testing.assert_allclose(fine, np.repeat(counts / 2, 2))
    np.testing.assert_allclose(rebin_histogram(counts, edges, edges), counts)
    wide = rebin_histogram(counts, edges, np.linspace(-2, 6, 5))  # beyond the range: zero
    np.testing.assert_allclose(wide, [0, counts[:2].sum(), counts[2:].sum(), 0])
    fig = colorful_dimension(np.arange(3), np.stack([counts] * 3), np.stack([edges] * 3))
    assert save(fig, Path(pytest.importorskip("tempfile").mkdtemp()), "c")[0].exists()


def test_tensorboard_export(probed_run: tuple[Store, int, list], tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from covshift.probe import TensorBoardSink

    _, _, kept = probed_run
    with TensorBoardSink(tmp_path) as sink:
        for record in kept:
            sink(record)
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    act = [r for r in kept if r.layer == "hidden.1.act"]
    scalars = events.Scalars("hidden.1.act/pooled_mean")
    assert [s.step for s in scalars] == [r.step for r in act]
    np.testing.assert_allclose(
        [s.value for s in scalars], [float(r.stats["pooled_mean"]) for r in act], rtol=1e-6
    )
    kl = events.Scalars("hidden.1.act/shift/kl")
    assert kl[-1].value == pytest.approx(compare(act[0].stats, act[-1].stats).layer["kl"], rel=1e-5)
    assert "hidden.1.linear/grad_ics_cos" in tags["scalars"]
    assert "(model)/beta_smoothness" in tags["scalars"]
    (hist,) = [h for h in events.Histograms("hidden.1.act/values") if h.step == act[-1].step]
    np.testing.assert_allclose(hist.histogram_value.bucket, act[-1].stats["hist"])
    np.testing.assert_allclose(
        hist.histogram_value.bucket_limit, act[-1].stats["hist_edges"][1:], rtol=1e-6
    )
    assert hist.histogram_value.num == act[-1].stats["hist"].sum()


def test_tensorboard_missing_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    from covshift.probe import TensorBoardSink

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"pip install 'covshift\[tensorboard\]'"):
        TensorBoardSink("unused")
    assert torch  # the module itself imports without tensorboard
