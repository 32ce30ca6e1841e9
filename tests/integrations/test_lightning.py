"""The Lightning Callback, on a real Trainer and a tiny MLP LightningModule: the
schedule in optimizer steps (with gradient accumulation), the recorded statistics
against a plain forward hook, the CSV and TensorBoard loggers' files, the store, the
hooks, a failure inside training, and the ranks other than 0."""

from __future__ import annotations

import csv
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

from covshift.integrations.lightning import ShiftProbeCallback  # noqa: E402
from covshift.probe import gradient_ics  # noqa: E402
from covshift.store import Store  # noqa: E402

LAYER = "net.1"  # the BatchNorm: its input is the first Linear's output (N, 16)


class MLP(pl.LightningModule):
    def __init__(self, fail_at: int | None = None, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(8, width), nn.BatchNorm1d(width), nn.Tanh(), nn.Linear(width, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.hparams.fail_at is not None and batch_idx == self.hparams.fail_at:
            raise RuntimeError(f"boom at batch {batch_idx}")
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def data(n: int = 96) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(n, 8, generator=g) * 2 + 1, torch.randint(0, 3, (n,), generator=g)
    )


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data(), batch_size=8, shuffle=False)


def trainer(tmp_path: Path, callbacks: list, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "max_steps": 6,
        "accelerator": "cpu",
        "devices": 1,
        "logger": CSVLogger(tmp_path, name="csv"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "callbacks": callbacks,
    }
    settings.update(overrides)
    return pl.Trainer(**settings)


class Checker(pl.Callback):
    """At every due optimizer step, the statistics of LAYER's input on the first
    training batch from a plain forward hook, and gradient ICS computed directly."""

    def __init__(self, batch: torch.Tensor, target: torch.Tensor, every: int, stats: Any) -> None:
        self.batch, self.target, self.every, self.plain_stats = batch, target, every, stats
        self.stats: dict[int, dict[str, np.ndarray]] = {}
        self.ics: dict[int, dict[str, Any]] = {}
        self.last = -1
        self.batches = 0

    def measure(self, trainer: Any, module: Any) -> None:
        step = trainer.global_step
        if step == self.last or step % self.every:
            return
        self.last = step
        self.stats[step] = self.plain_stats(module, LAYER, lambda m: m(self.batch), 1)
        self.ics[step] = gradient_ics(module, trainer.optimizers[0], self.batch, self.target)

    def on_train_start(self, trainer: Any, module: Any) -> None:
        self.measure(trainer, module)

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self.batches += 1
        self.measure(trainer, module)


def test_schedule_values_loggers_store(tmp_path: Path, plain_stats: Any, hookless: Any) -> None:
    torch.manual_seed(0)
    module = MLP()
    x, y = data()[:8]  # the first training batch (no shuffling)
    callback = ShiftProbeCallback(
        every=2,
        probe_size=6,
        grad_ics=True,
        grad_ics_loss=F.cross_entropy,
        store=tmp_path / "covshift.db",
    )
    checker = Checker(x[:6], y[:6], 2, plain_stats)
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    fit = trainer(
        tmp_path,
        [callback, checker],
        accumulate_grad_batches=2,
        logger=[CSVLogger(tmp_path, name="csv"), tensorboard],
    )
    fit.fit(module, loader())

    # The schedule: optimizer steps 0, 2, 4, 6 of 6, two batches per step.
    assert checker.batches == 12
    steps = [0, 2, 4, 6]
    assert sorted({r.step for r in callback.records}) == steps
    assert {r.layer for r in callback.records if "mean" in r.stats} == {"net.1", "net.2"}

    # The values: a plain hook's on the first batch's first 6 examples, at each step.
    recorded = {r.step: r.stats for r in callback.records if r.layer == LAYER}
    assert sorted(checker.stats) == steps
    for step in steps:
        for key in ("mean", "std", "pooled_mean", "pooled_std"):
            np.testing.assert_allclose(
                recorded[step][key], checker.stats[step][key], rtol=1e-5, atol=1e-7
            )
        assert int(recorded[step]["count"]) == 6
        for layer, ics in checker.ics[step].items():
            got = next(r.stats for r in callback.records if r.layer == layer and r.step == step)
            assert float(got["grad_ics_l2"]) == pytest.approx(ics.l2, rel=1e-5, abs=1e-9)
    assert not np.allclose(recorded[0]["mean"], recorded[6]["mean"])

    # Every logger received them at the record's step.
    with open(next(tmp_path.glob("csv/**/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    name = f"covshift/{LAYER}/pooled_mean"
    logged = [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]
    assert [s for s, _ in logged] == steps
    np.testing.assert_allclose(
        [v for _, v in logged], [float(recorded[s]["pooled_mean"]) for s in steps], rtol=1e-6
    )
    assert any(r.get("covshift/net.0/grad_ics_cos") for r in rows)
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = ea.EventAccumulator(tensorboard.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    assert [s.step for s in events.Scalars(f"covshift/{LAYER}/shift/kl")] == steps

    # The store: the run, its records, the module's logged loss.
    with Store(tmp_path / "covshift.db", create=False) as store:
        run = store.run(callback.run_id)
        assert run.status == "finished"
        assert run.config["model"] == "MLP" and run.config["accumulate_grad_batches"] == 2
        assert store.probe(run.id, LAYER, "std")[0].tolist() == steps
        assert store.scalars(run.id, "train_loss")[0].tolist() == steps[1:]

    assert hookless(module)


def test_given_batch_submodule_live_source(tmp_path: Path, plain_stats: Any, hookless: Any) -> None:
    """A probe batch given, layers named inside a submodule (module="net"); and live
    training batches with gradient ICS (its model copies must not carry the hooks)."""
    torch.manual_seed(0)
    module = MLP()
    probe = torch.randn(5, 8)
    callback = ShiftProbeCallback(module="net", layers=["1"], probe_input=probe, every=3)
    initial = plain_stats(module.net, "1", lambda m: m(probe), 1)
    trainer(tmp_path, [callback]).fit(module, loader())
    assert [r.step for r in callback.records] == [0, 3, 6]
    np.testing.assert_allclose(callback.records[0].stats["mean"], initial["mean"], rtol=1e-5)
    assert hookless(module)

    live = ShiftProbeCallback(
        source="train", layers="net.2", every=2, grad_ics=True, grad_ics_loss=F.cross_entropy
    )
    trainer(tmp_path, [live]).fit(MLP(), loader())
    # Live records: the forward after each due step, of a full training batch of 8.
    assert sorted({r.step for r in live.records if r.layer == "net.2"}) == [0, 2, 4]
    assert all(int(r.stats["count"]) == 8 for r in live.records if r.layer == "net.2")


def test_exception_in_training_closes_the_run_failed(tmp_path: Path, hookless: Any) -> None:
    torch.manual_seed(0)
    module = MLP(fail_at=4)
    callback = ShiftProbeCallback(source="train", every=1, store=tmp_path / "c.db")
    with pytest.raises(RuntimeError, match="boom at batch 4"):
        trainer(tmp_path, [callback]).fit(module, loader())
    with Store(tmp_path / "c.db", create=False) as store:
        run = store.run(callback.run_id)
        assert run.status == "failed" and "boom at batch 4" in run.error
        assert store.probe(run.id, LAYER, "mean")[0].tolist() == [0, 1, 2, 3]
    assert hookless(module)  # the capture armed at step 4 was removed


def test_ranks_other_than_zero_do_nothing(tmp_path: Path, hookless: Any) -> None:
    module = MLP()
    callback = ShiftProbeCallback(every=1, store=tmp_path / "c.db")
    fake = types.SimpleNamespace(
        is_global_zero=False,
        global_step=0,
        max_steps=6,
        max_epochs=None,
        accumulate_grad_batches=1,
        optimizers=[],
        loggers=[],
        callback_metrics={},
    )
    callback.on_train_start(fake, module)
    batch = next(iter(loader()))
    callback.on_train_batch_start(fake, module, batch, 0)
    fake.global_step = 1
    callback.on_train_batch_end(fake, module, None, batch, 0)
    callback.on_train_end(fake, module)
    assert callback.records == [] and callback.run_id is None
    assert not (tmp_path / "c.db").exists()
    assert hookless(module)


def test_grad_ics_needs_a_loss() -> None:
    with pytest.raises(ValueError, match="grad_ics_loss"):
        ShiftProbeCallback(grad_ics=True)


def test_errors_say_what_to_do(tmp_path: Path) -> None:
    class NoForward(MLP):
        forward = pl.LightningModule.forward

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    with pytest.raises(TypeError, match="module='net'"):
        trainer(tmp_path, [ShiftProbeCallback(every=2)]).fit(NoForward(), loader())

    class Direct(MLP):  # a forward, but the training step calls the submodule itself
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    with pytest.warns(UserWarning, match="saw no training forward"):
        trainer(tmp_path, [ShiftProbeCallback(source="train", every=2)]).fit(Direct(), loader())

    sharded = MLP()
    sharded.net[0].weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its parameters with
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        trainer(tmp_path, [ShiftProbeCallback(every=2)]).fit(sharded, loader())
