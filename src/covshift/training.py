"""The one training loop every experiment uses.

Deterministic for a given model, data, config and seed on the same machine: the
batches come from a seeded :class:`~covshift.data.BatchSampler`, and nothing else
draws random numbers unless the model does. The step itself is what a hand-written
PyTorch loop does (index the resident dataset, forward, cross-entropy, backward,
SGD or AdamW step, the learning rate warmed up linearly if asked); the loss is
accumulated on the device and read back only at evaluation points, so the loop adds
no synchronization per step. Callbacks see every step and
every evaluation (probes, logging, progress bars); at an evaluation a callback may
declare an outcome (``state.outcome = "diverged"``) and ask the loop to stop there
(``state.stop = True``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from covshift.checkpoints import Checkpointer, as_checkpointer
from covshift.data import BatchSampler, Dataset, is_text
from covshift.losses import loss_function, squared_error
from covshift.optimizers import DECAYS, OPTIMIZERS, learning_rate, make_optimizer
from covshift.train_checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "Callback",
    "DivergenceGuard",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "evaluate",
    "resolve_device",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        steps: number of optimizer steps.
        batch_size: examples per step.
        lr: learning rate (after the warm-up).
        momentum: SGD momentum (0 = plain SGD); SGD only.
        weight_decay: SGD's L2 penalty coefficient, or AdamW's decoupled weight decay
            (Loshchilov & Hutter 2019), on every parameter.
        optimizer: ``sgd`` or ``adamw`` (``torch.optim.AdamW``, eps 1e-8).
        betas: AdamW's ``(beta1, beta2)``; AdamW only.
        warmup_steps: the learning rate rises linearly over the first this many steps,
            ``lr * min(1, step / warmup_steps)`` at step ``step = 1, 2, ...`` (0: none),
            then stays at ``lr`` or decays (``lr_decay``).
        lr_decay: ``none`` (constant after the warm-up) or ``cosine`` (to 0 over the
            steps after the warm-up: :func:`covshift.optimizers.learning_rate`).
        eval_every: evaluate on the full test set every this many steps (and at step
            0 and at the last step); 0 disables periodic evaluation.
        seed: seed of the batch sampler.
    """

    steps: int
    batch_size: int = 60
    lr: float = 0.5
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_every: int = 500
    seed: int = 0
    optimizer: Literal["sgd", "adamw"] = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_decay: Literal["none", "cosine"] = "none"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.eval_every < 0:
            raise ValueError(
                f"eval_every must be >= 0 (0 = only at the end), got {self.eval_every}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.optimizer != "sgd" and self.momentum != 0:
            raise ValueError(
                f"momentum is SGD's; {self.optimizer} has betas (beta1 is its momentum)"
            )
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (0: none), got {self.warmup_steps}")
        if self.lr_decay not in DECAYS:
            raise ValueError(f"lr_decay must be one of {', '.join(DECAYS)}, got {self.lr_decay!r}")
        if self.lr_decay != "none" and self.warmup_steps >= self.steps:
            raise ValueError(
                f"a {self.lr_decay} decay needs steps ({self.steps}) > warmup_steps "
                f"({self.warmup_steps})"
            )

    @property
    def scheduled(self) -> bool:
        """Whether the learning rate changes during the run (warm-up or decay)."""
        return bool(self.warmup_steps) or self.lr_decay != "none"

    def lr_at(self, lr: float, step: int) -> float:
        """``lr``'s rate at step ``step`` under this run's warm-up and decay."""
        return learning_rate(lr, self.warmup_steps, step, self.steps, self.lr_decay)


@dataclass
class TrainState:
    """What callbacks see: the live objects and where the loop is."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: Dataset
    config: TrainConfig
    device: torch.device
    step: int = 0
    loss: torch.Tensor | None = None  # last step's loss, on the device (no sync)
    metrics: dict[str, float] = field(default_factory=dict)  # of the last evaluation
    outcome: str | None = None  # set by a callback: "diverged" (None: finished normally)
    outcome_step: int | None = None  # the step at which the outcome was declared
    stop: bool = False  # set by a callback at an evaluation: end training there


class Callback(Protocol):
    """Hooks into :func:`train`; implement any subset (missing methods are skipped)."""

    def on_train_start(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None: ...
    def on_train_end(self, state: TrainState, status: str) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    """Evaluation history and timing of a finished run."""

    history: dict[int, dict[str, float]]
    seconds: float
    steps: int
    status: str = "finished"  # or the outcome a callback declared ("diverged")
    outcome_step: int | None = None

    @property
    def final(self) -> dict[str, float]:
        return self.history[max(self.history)]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; anything else must exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was asked for but torch sees no CUDA device; use 'cpu'"
        )
    if resolved.type == "cuda" and resolved.index is not None:
        count = torch.cuda.device_count()
        if resolved.index >= count:
            raise ValueError(
                f"device {str(device)!r}: torch sees {count} CUDA device"
                f"{'s' * (count != 1)} (cuda:0 .. cuda:{count - 1})"
            )
    return resolved


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 10_000
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` (in eval mode) on ``(x, y)``; for
    real targets, the mean squared error (:func:`squared_error`) alone. For sequences
    (integer targets ``(N, T)``, logits ``(N, T, V)``) both are per position, over
    all ``N * T`` positions, and ``chunk`` counts positions, not examples."""
    was_training = model.training
    model.eval()
    regression = y.is_floating_point()
    positions = 1 if regression or y.dim() == 1 else y[0].numel()
    rows = max(1, chunk // positions)
    try:
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        loss = torch.zeros((), dtype=torch.float64, device=x.device)
        for start in range(0, len(x), rows):
            out = model(x[start : start + rows])
            target = y[start : start + rows]
            if regression:
                loss += squared_error(out, target).double() * len(target)
                continue
            out, target = out.flatten(0, -2), target.flatten()  # (N, K) for labels too
            correct += (out.argmax(dim=1) == target).sum()
            loss += F.cross_entropy(out, target, reduction="sum").double()
    finally:
        model.train(was_training)
    count = len(x) * positions
    if regression:
        return {"test_loss": loss.item() / count}
    return {"test_accuracy": correct.item() / count, "test_loss": loss.item() / count}


def config_optimizer(
    params: Iterable[torch.nn.Parameter], config: TrainConfig
) -> torch.optim.Optimizer:
    """The optimizer ``config`` trains with (:func:`~covshift.optimizers.make_optimizer`
    of its kind, learning rate, momentum, weight decay and betas), over ``params``."""
    return make_optimizer(
        params,
        config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        betas=config.betas,
    )


def _call(callbacks: Sequence[object], method: str, *args: object) -> None:
    for cb in callbacks:
        fn = getattr(cb, method, None)
        if fn is not None:
            fn(*args)


class DivergenceGuard:
    """Declares a run ``diverged`` at the first evaluation where the mean training loss
    since the previous evaluation or the test loss is not finite or exceeds ``factor``
    times the test loss at step 0; with ``stop``, training ends there.

    The rule is checked at evaluations only, so the loop keeps its no-sync steps; the
    recorded step is the evaluation at which the rule fired.
    """

    def __init__(self, factor: float = 10.0, stop: bool = True) -> None:
        if not factor > 1:
            raise ValueError(f"factor must be > 1, got {factor}")
        self.factor = factor
        self.stop = stop
        self.initial: float | None = None

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        if state.outcome is not None:
            return
        if self.initial is None:  # resumed runs see their step-0 loss in the history
            self.initial = metrics["test_loss"] if state.step == 0 else None
        losses = [metrics["test_loss"], metrics.get("train_loss", 0.0)]
        limit = self.factor * self.initial if self.initial is not None else math.inf
        if any(not math.isfinite(v) or v > limit for v in losses):
            state.outcome, state.outcome_step = "diverged", state.step
            state.stop = self.stop

    def state_dict(self) -> dict[str, float | None]:
        return {"initial": self.initial}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.initial = state["initial"]


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    *,
    callbacks: Sequence[object] = (),
    device: str | torch.device = "auto",
    checkpoint: str | os.PathLike[str] | Checkpointer | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with SGD or AdamW and cross-entropy (per position
    for text, squared error for real targets, :func:`loss_function`).

    Evaluates on the whole test set at step 0, every ``eval_every`` steps and at the
    last step; each evaluation also reports ``train_loss``, the mean training loss
    since the previous evaluation. For text (:func:`covshift.data.is_text`) both
    losses are also reported in bits per byte, ``test_bpb`` and ``train_bpb``
    (the loss in nats over ln 2), comparable with the corpus's unigram baseline
    (:attr:`covshift.data.TextDataset.unigram_bits`).

    With ``checkpoint`` (a file path or a :class:`~covshift.checkpoints.Checkpointer`),
    the model, optimizer, sampler and random states, the evaluation history, the
    declared outcome and the state of every callback with ``state_dict`` are saved at
    every evaluation, and if a state is there when training starts, training continues
    from it: an interrupted run resumed this way ends with the same numbers as an
    uninterrupted one.

    A callback may declare an outcome at an evaluation (``state.outcome``, see
    :class:`DivergenceGuard`) and stop training there (``state.stop``); the run then
    ends with that status. On Ctrl-C or an error, callbacks get
    ``on_train_end(state, "interrupted" | "failed")`` and the exception propagates;
    what callbacks recorded stays recorded.
    """
    dev = resolve_device(device)
    data = data if data.x_train.device == dev else data.to(dev)
    model.to(dev).train()
    optimizer = config_optimizer(model.parameters(), config)
    sampler = BatchSampler(len(data.x_train), config.batch_size, config.seed)
    criterion = loss_function(data)
    bits = 1 / math.log(2) if is_text(data) else None  # nats -> bits per byte
    state = TrainState(model, optimizer, data, config, dev)
    history: dict[int, dict[str, float]] = {}
    loss_sum = torch.zeros((), device=dev)
    since_eval = 0
    first_step = 1
    keeper = as_checkpointer(checkpoint)
    if keeper is not None:
        resumed = load_checkpoint(keeper, state, sampler, callbacks)
        if resumed is not None:
            history = resumed
            first_step = state.step + 1

    def run_eval() -> None:
        nonlocal since_eval
        metrics = evaluate(model, data.x_test, data.y_test)
        if since_eval:
            metrics["train_loss"] = loss_sum.item() / since_eval
            loss_sum.zero_()
            since_eval = 0
        if bits is not None:
            for split in ("test", "train"):
                if f"{split}_loss" in metrics:
                    metrics[f"{split}_bpb"] = metrics[f"{split}_loss"] * bits
        history[state.step] = metrics
        state.metrics = metrics
        _call(callbacks, "on_eval", state, metrics)
        if keeper is not None and state.step < config.steps and not state.stop:
            save_checkpoint(keeper, state, sampler, history, callbacks)

    start = time.perf_counter()
    try:
        _call(callbacks, "on_train_start", state)
        if first_step == 1:  # a resumed run has this evaluation in its history already
            run_eval()
        for step in range(first_step, config.steps + 1):
            idx = sampler.next().to(dev, non_blocking=True)
            x, y = data.x_train[idx], data.y_train[idx]
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.scheduled:
                for group in optimizer.param_groups:
                    group["lr"] = config.lr_at(config.lr, step)
            optimizer.step()
            loss_sum += loss.detach()
            since_eval += 1
            state.step, state.loss = step, loss
            _call(callbacks, "on_step_end", state)
            if step == config.steps or (config.eval_every and step % config.eval_every == 0):
                run_eval()
                if state.stop:
                    break
    except KeyboardInterrupt:
        _call(callbacks, "on_train_end", state, "interrupted")
        raise
    except BaseException:
        _call(callbacks, "on_train_end", state, "failed")
        raise
    status = state.outcome or "finished"
    _call(callbacks, "on_train_end", state, status)
    if keeper is not None:
        keeper.clear()
    return TrainResult(history, time.perf_counter() - start, state.step, status, state.outcome_step)
