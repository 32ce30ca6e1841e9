"""The training loop: correctness against a plain loop, determinism, callbacks,
interruption and resumption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from covshift.callbacks import StoreRecorder
from covshift.checkpoints import (
    BytesCheckpointer,
    Checkpointer,
    CheckpointOwnerError,
    FileCheckpointer,
)
from covshift.data import BatchSampler, Dataset
from covshift.models import build_mlp
from covshift.store import Store
from covshift.training import DivergenceGuard, TrainConfig, evaluate, resolve_device, train


def test_matches_a_plain_pytorch_loop(small_data: Dataset) -> None:
    config = TrainConfig(steps=40, batch_size=30, lr=0.3, momentum=0.5, eval_every=0, seed=4)
    ours = build_mlp(784, 10, width=16, norm="batch", seed=1)
    train(ours, small_data, config, device="cpu")

    plain = build_mlp(784, 10, width=16, norm="batch", seed=1)
    opt = torch.optim.SGD(plain.parameters(), lr=0.3, momentum=0.5)
    sampler = BatchSampler(len(small_data.x_train), 30, seed=4)
    for _ in range(40):
        idx = sampler.next()
        loss = F.cross_entropy(plain(small_data.x_train[idx]), small_data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(ours.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_deterministic(small_data: Dataset) -> None:
    config = TrainConfig(steps=60, batch_size=20, lr=0.5, eval_every=20, seed=2)
    results, weights = [], []
    for _ in range(2):
        net = build_mlp(784, 10, width=12, norm="batch", seed=0)
        results.append(train(net, small_data, config, device="cpu").history)
        weights.append(net.state_dict())
    assert results[0] == results[1]
    for a, b in zip(weights[0].values(), weights[1].values(), strict=True):
        assert torch.equal(a, b)
    other = build_mlp(784, 10, width=12, norm="batch", seed=0)
    changed = train(
        other,
        small_data,
        TrainConfig(steps=60, batch_size=20, lr=0.5, eval_every=20, seed=3),
        device="cpu",
    )
    assert changed.history != results[0]


def test_evaluation_schedule_and_values(small_data: Dataset) -> None:
    net = build_mlp(784, 10, width=12, seed=0)
    result = train(
        net, small_data, TrainConfig(steps=25, batch_size=10, eval_every=10), device="cpu"
    )
    assert sorted(result.history) == [0, 10, 20, 25]
    assert "train_loss" not in result.history[0] and "train_loss" in result.history[25]
    manual = evaluate(net, small_data.x_test, small_data.y_test)
    assert manual == {k: v for k, v in result.final.items() if k != "train_loss"}
    logits = net(small_data.x_test)
    acc = (logits.argmax(1) == small_data.y_test).float().mean().item()
    assert abs(manual["test_accuracy"] - acc) < 1e-6
    assert net.training  # evaluation restored the training mode


def test_learns(small_data: Dataset) -> None:
    net = build_mlp(784, 10, width=32, norm="batch", seed=0)
    result = train(
        net, small_data, TrainConfig(steps=150, batch_size=30, lr=0.5, eval_every=0), device="cpu"
    )
    assert result.history[0]["test_accuracy"] < 0.3
    assert result.final["test_accuracy"] > 0.9


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_train_start(self, state) -> None:
        self.events.append(("start", state.step))

    def on_step_end(self, state) -> None:
        self.events.append(("step", state.step))

    def on_eval(self, state, metrics) -> None:
        self.events.append(("eval", state.step))

    def on_train_end(self, state, status) -> None:
        self.events.append(("end", status))


class StopAt:
    def __init__(self, step: int, exc: type[BaseException]) -> None:
        self.step, self.exc = step, exc

    def on_step_end(self, state) -> None:
        if state.step == self.step:
            raise self.exc()


def test_callbacks_order(small_data: Dataset) -> None:
    rec = Recorder()
    train(
        build_mlp(784, 10, width=8),
        small_data,
        TrainConfig(steps=4, batch_size=10, eval_every=2),
        callbacks=[rec],
        device="cpu",
    )
    assert rec.events == [
        ("start", 0),
        ("eval", 0),
        ("step", 1),
        ("step", 2),
        ("eval", 2),
        ("step", 3),
        ("step", 4),
        ("eval", 4),
        ("end", "finished"),
    ]


@pytest.mark.parametrize(
    ("exc", "status"), [(KeyboardInterrupt, "interrupted"), (RuntimeError, "failed")]
)
def test_interruption_reaches_callbacks(small_data: Dataset, exc: type, status: str) -> None:
    rec = Recorder()
    with pytest.raises(exc):
        train(
            build_mlp(784, 10, width=8),
            small_data,
            TrainConfig(steps=10, batch_size=10),
            callbacks=[StopAt(3, exc), rec],
            device="cpu",
        )
    assert rec.events[-1] == ("end", status)


def test_resume_from_checkpoint_gives_the_same_numbers(small_data: Dataset, tmp_path: Path) -> None:
    config = TrainConfig(steps=50, batch_size=20, lr=0.4, momentum=0.9, eval_every=10, seed=1)
    straight_net = build_mlp(784, 10, width=12, norm="batch", seed=0)
    straight = train(straight_net, small_data, config, device="cpu")

    ckpt = tmp_path / "run.pt"
    net = build_mlp(784, 10, width=12, norm="batch", seed=0)
    with pytest.raises(KeyboardInterrupt):
        train(
            net,
            small_data,
            config,
            device="cpu",
            checkpoint=ckpt,
            callbacks=[StopAt(27, KeyboardInterrupt)],
        )
    assert ckpt.exists()
    resumed_net = build_mlp(784, 10, width=12, norm="batch", seed=0)
    rec = Recorder()
    resumed = train(resumed_net, small_data, config, device="cpu", checkpoint=ckpt, callbacks=[rec])
    assert rec.events[0] == ("start", 20)  # continued from the last evaluation
    assert resumed.history == straight.history
    for a, b in zip(
        resumed_net.state_dict().values(), straight_net.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert not ckpt.exists()  # removed once the run finished


def test_bytes_checkpointer_resumes_like_a_file(small_data: Dataset) -> None:
    config = TrainConfig(steps=40, batch_size=20, lr=0.4, momentum=0.9, eval_every=10, seed=2)
    straight = train(
        build_mlp(784, 10, width=12, norm="batch", seed=0), small_data, config, device="cpu"
    )
    sent: list[bytes] = []
    keeper = BytesCheckpointer(on_save=sent.append)
    with pytest.raises(KeyboardInterrupt):
        train(
            build_mlp(784, 10, width=12, norm="batch", seed=0),
            small_data,
            config,
            device="cpu",
            checkpoint=keeper,
            callbacks=[StopAt(25, KeyboardInterrupt)],
        )
    assert len(sent) == 3  # the states of steps 0, 10 and 20, each handed over
    # A fresh process would get only the bytes: resume from them.
    resumed = train(
        build_mlp(784, 10, width=12, norm="batch", seed=0),
        small_data,
        config,
        device="cpu",
        checkpoint=BytesCheckpointer(sent[-1]),
    )
    assert resumed.history == straight.history


def _first_divergent_eval(history: dict[int, dict[str, float]], factor: float) -> int | None:
    import math

    limit = factor * history[0]["test_loss"]
    for step in sorted(history):
        losses = [history[step]["test_loss"], history[step].get("train_loss", 0.0)]
        if any(not math.isfinite(v) or v > limit for v in losses):
            return step
    return None


@pytest.mark.parametrize("stop", [True, False])
def test_divergence_guard(small_data: Dataset, stop: bool) -> None:
    config = TrainConfig(steps=60, batch_size=20, lr=5000.0, eval_every=10, seed=0)
    free = train(build_mlp(784, 10, width=12, seed=0), small_data, config, device="cpu")
    expected = _first_divergent_eval(free.history, 10.0)
    assert expected is not None and free.status == "finished"  # no guard: no outcome
    rec = Recorder()
    result = train(
        build_mlp(784, 10, width=12, seed=0),
        small_data,
        config,
        device="cpu",
        callbacks=[DivergenceGuard(10.0, stop=stop), rec],
    )
    assert (result.status, result.outcome_step) == ("diverged", expected)
    assert result.steps == (expected if stop else 60)
    assert rec.events[-1] == ("end", "diverged")
    calm = train(
        build_mlp(784, 10, width=12, seed=0),
        small_data,
        TrainConfig(steps=30, batch_size=20, lr=0.1, eval_every=10),
        device="cpu",
        callbacks=[DivergenceGuard()],
    )
    assert calm.status == "finished" and calm.outcome_step is None
    with pytest.raises(ValueError, match="factor must be > 1"):
        DivergenceGuard(1.0)


def test_store_recorder_closes_a_diverged_run_with_its_step(
    small_data: Dataset, tmp_path: Path
) -> None:
    """The one store path writes what the sweep's points write: a diverged run gets its
    status and ``diverged_at``, the evaluations their scalars."""
    config = TrainConfig(steps=60, batch_size=20, lr=5000.0, eval_every=10, seed=0)
    with Store(tmp_path / "s.db") as store:
        run_id = store.start_run("diverges", config={}, seed=0)
        result = train(
            build_mlp(784, 10, width=12, seed=0),
            small_data,
            config,
            device="cpu",
            callbacks=[DivergenceGuard(10.0), StoreRecorder(store, run_id)],
        )
        info = store.run(run_id)
        assert (info.status, info.diverged_at) == ("diverged", result.outcome_step)
        steps, _ = store.scalars(run_id, "test_loss")
        assert list(steps) == sorted(result.history)


def test_foreign_checkpoint_is_refused(small_data: Dataset, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.pt"
    net = build_mlp(784, 10, width=12, seed=0)
    with pytest.raises(KeyboardInterrupt):
        train(
            net,
            small_data,
            TrainConfig(steps=20, batch_size=10, eval_every=5),
            device="cpu",
            checkpoint=ckpt,
            callbacks=[StopAt(7, KeyboardInterrupt)],
        )
    with pytest.raises(ValueError, match="cannot be resumed for this model"):
        train(
            build_mlp(784, 10, width=13, seed=0),
            small_data,
            TrainConfig(steps=20, batch_size=10, eval_every=5),
            device="cpu",
            checkpoint=ckpt,
        )


@pytest.mark.parametrize("kind", ["file", "bytes"])
def test_checkpoint_of_another_owner_is_refused(
    small_data: Dataset, tmp_path: Path, kind: str
) -> None:
    """A state records its owner; another owner is refused with both names (even with
    the same model, which would otherwise resume silently), the same owner resumes."""
    config = TrainConfig(steps=20, batch_size=10, eval_every=5)
    saved: list[bytes] = []

    def keeper(owner: str | None) -> Checkpointer:
        if kind == "file":
            return FileCheckpointer(tmp_path / "run.pt", owner=owner)
        return BytesCheckpointer(saved[-1] if saved else None, saved.append, owner=owner)

    with pytest.raises(KeyboardInterrupt):
        train(
            build_mlp(784, 10, width=12, seed=0),
            small_data,
            config,
            device="cpu",
            checkpoint=keeper("store a/run 1"),
            callbacks=[StopAt(7, KeyboardInterrupt)],
        )
    with pytest.raises(
        CheckpointOwnerError, match="belongs to store a/run 1, not to store b/run 1"
    ):
        train(
            build_mlp(784, 10, width=12, seed=0),
            small_data,
            config,
            device="cpu",
            checkpoint=keeper("store b/run 1"),
        )
    resumed = train(
        build_mlp(784, 10, width=12, seed=0),
        small_data,
        config,
        device="cpu",
        checkpoint=keeper("store a/run 1"),
    )
    fresh = train(build_mlp(784, 10, width=12, seed=0), small_data, config, device="cpu")
    assert resumed.history == fresh.history


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"steps": 1, "lr": 0.0}, "lr must be a positive number"),
        ({"steps": 1, "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"steps": 1, "eval_every": -1}, "eval_every must be >= 0"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda(small_data: Dataset) -> None:
    net = build_mlp(784, 10, width=16, norm="batch")
    result = train(net, small_data, TrainConfig(steps=20, batch_size=20), device="cuda")
    assert next(net.parameters()).is_cuda and result.final["test_accuracy"] > 0


def test_covshift_batchnorm_trains_like_torch_nn(small_data: Dataset) -> None:
    # The builder uses covshift's own layers; swapping torch.nn's in gives the same run.
    from torch import nn

    from covshift.nn import BatchNorm1d

    config = TrainConfig(steps=200, batch_size=60, lr=0.5, eval_every=50, seed=0)
    ours = build_mlp(784, 10, width=32, norm="batch", seed=0)
    assert isinstance(ours.hidden[0].norm, BatchNorm1d)
    theirs = build_mlp(784, 10, width=32, norm="batch", seed=0)
    for block in theirs.hidden:
        block.norm = nn.BatchNorm1d(32)
    a = train(ours, small_data, config, device="cpu").history
    b = train(theirs, small_data, config, device="cpu").history
    for step in a:
        assert a[step]["test_accuracy"] == b[step]["test_accuracy"]
        assert abs(a[step]["test_loss"] - b[step]["test_loss"]) < 1e-4
    for p, q in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        if p.dtype.is_floating_point:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)
