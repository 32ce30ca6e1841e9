"""Shared machinery of the measurements that must leave training untouched.

Gradient ICS and landscape smoothness evaluate the loss and its gradient at weights
the training never visits. They work on a deep copy of the model (and optimizer),
inside ``torch.random.fork_rng`` so that the global random state after a measurement
is the one before it, and they rewind the copy's random state before every forward so
that all evaluations of one measurement see the same dropout masks: differences
between gradients then come from the weights alone.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from covshift.probe.batch import ProbeBatch

__all__ = ["Evaluator", "LossFn", "deep_copy", "isolated_randomness"]

LossFn = Callable[[Any, Any], torch.Tensor]


def deep_copy(*objects: Any) -> Any:
    """``copy.deepcopy`` of several objects in ONE memo, so that a copied optimizer
    refers to the copied model's parameters (its state is keyed by them)."""
    try:
        return copy.deepcopy(objects)
    except Exception as error:
        raise RuntimeError(
            "measuring without side effects needs copy.deepcopy of the model (and "
            f"optimizer) to work, and it failed: {error}. Measure an uncompiled model."
        ) from error


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


@contextlib.contextmanager
def isolated_randomness(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Inside: the global CPU and CUDA random states are restored on exit. Yields
    ``rewind()``, which resets them to what they were on entry."""
    devices = _cuda_devices(model)
    with torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]

        def rewind() -> None:
            torch.set_rng_state(cpu)
            for d, state in zip(devices, cuda, strict=True):
                torch.cuda.set_rng_state(state, d)

        yield rewind


class Evaluator:
    """Loss and gradient of a model copy on one batch, at chosen parameter values.

    Buffers (BatchNorm running statistics, counters) are reset to their values at
    construction before every evaluation, so one evaluation's train-mode forward does
    not leak into the next. ``inputs`` is what the model is called with: a tensor, a
    tuple of positional arguments, a dict of keyword arguments (a Hugging Face batch)
    or a :class:`~covshift.probe.batch.ProbeBatch`.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        targets: Any,
        loss_fn: LossFn,
        rewind: Callable[[], None],
    ) -> None:
        self.model = model
        self.inputs = _as_call(inputs)
        self.targets = targets
        self.loss_fn = loss_fn
        self.rewind = rewind
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = [b.detach().clone() for b in model.buffers()]

    def __call__(
        self, values: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss (0-d, detached) and gradients at ``values`` (default: current values)."""
        with torch.no_grad():
            if values is not None:
                for p, v in zip(self.params, values, strict=True):
                    p.copy_(v)
            for b, v in zip(self.model.buffers(), self.buffers, strict=True):
                b.copy_(v)
        self.rewind()
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = self.loss_fn(self.inputs(self.model), self.targets)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)
        ]
        return loss.detach(), grads


def _as_call(inputs: Any) -> ProbeBatch:
    """The model's arguments: a ProbeBatch as it is, a dict as keyword arguments, a
    tuple as positional arguments, anything else as the one positional argument."""
    if isinstance(inputs, ProbeBatch):
        return inputs
    if isinstance(inputs, Mapping):
        return ProbeBatch((), dict(inputs))
    return ProbeBatch(inputs if isinstance(inputs, tuple) else (inputs,))


def draw_batch(state: Any, batch_size: int | None, seed: int, step: int) -> tuple[Any, Any]:
    """A training batch for a measurement inside covshift's loop, drawn by a private
    generator (seeded by ``seed`` and ``step``) so that the loop's own random stream
    and batch order are untouched."""
    data = state.data
    size = batch_size or state.config.batch_size
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(len(data.x_train), (size,), generator=generator).to(data.x_train.device)
    return data.x_train[idx], data.y_train[idx]
