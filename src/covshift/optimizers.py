"""The optimizers of the training loop (:func:`make_optimizer`) and its learning-rate
warm-up (:func:`learning_rate`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["OPTIMIZERS", "learning_rate", "make_optimizer"]

OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    kind: str,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` (``momentum``; ``weight_decay`` an L2 penalty) or
    ``torch.optim.AdamW`` (Loshchilov & Hutter 2019: ``betas``, eps 1e-8;
    ``weight_decay`` decoupled from the gradient), over every parameter."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")


def learning_rate(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of step ``step`` (1, 2, ...): linear warm-up, ``lr * (step /
    warmup_steps)`` over the first ``warmup_steps`` steps, then ``lr`` (the rates of
    ``LambdaLR`` with ``lambda k: min(1, (k + 1) / warmup_steps)``, to the bit)."""
    if warmup_steps and step < warmup_steps:
        return lr * (step / warmup_steps)
    return lr
