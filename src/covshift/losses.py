"""The training losses, chosen by the data: :func:`loss_function`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from covshift.data import Dataset, is_text

__all__ = ["loss_function", "next_token_cross_entropy", "squared_error"]


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(1/N) sum_n ||f(x_n) - y_n||^2``: the regression loss (Santurkar et al. 2018's
    deep linear network), summed over outputs and averaged over examples."""
    return (outputs - targets).pow(2).flatten(1).sum(dim=1).mean()


def next_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) over every position: logits ``(B, T, V)``, targets
    ``(B, T)`` (a language model's next-token loss)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def loss_function(data: Dataset) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss for ``data``: cross-entropy on labels, per position for text
    (:func:`next_token_cross_entropy`), squared error on real targets
    (:attr:`Dataset.is_regression`)."""
    if is_text(data):
        return next_token_cross_entropy
    return squared_error if data.is_regression else F.cross_entropy
