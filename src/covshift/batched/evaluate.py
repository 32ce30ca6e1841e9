"""Each member's loss and evaluation from one batched forward, with no reduction
across members: member ``k``'s numbers come from its own rows alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from covshift.training import evaluate

if TYPE_CHECKING:
    from covshift.batched.models import StackedModel

__all__ = ["evaluate_each", "evaluate_members", "gather_rows", "member_losses"]


def gather_rows(table: Tensor, idx: Tensor) -> Tensor:
    """``table[idx]`` for a 2-D index (``(K, B)`` or ``(B, K)``): the same rows, by one
    ``index_select`` (several times faster than advanced indexing here)."""
    return torch.index_select(table, 0, idx.reshape(-1)).view(*idx.shape, *table.shape[1:])


def member_losses(out: Tensor, targets: Tensor, regression: bool) -> Tensor:
    """``(K,)``: each member's training loss on its batch, as :func:`covshift.training.train`
    computes it: the mean cross-entropy over the batch, or for real targets the mean over
    the batch of ``||f(x) - y||^2`` (:func:`covshift.losses.squared_error`).

    ``out`` is ``(K, B, outputs)``; ``targets`` ``(K, B)`` labels or ``(K, B, outputs)``.
    Backpropagating their sum gives each member the gradient of its own loss.
    """
    k, b = out.shape[:2]
    if regression:
        return (out - targets).pow(2).flatten(2).sum(dim=2).mean(dim=1)
    per_example = F.cross_entropy(out.reshape(k * b, -1), targets.reshape(k * b), reduction="none")
    return per_example.view(k, b).mean(dim=1)


def _eval_chunk(members: int, members_first: bool) -> int:
    # Fully connected members evaluate in the chunks of a one-at-a-time evaluation; a
    # convolutional batch holds K feature maps per example, so fewer examples at once.
    return 10_000 if members_first else max(16, 4096 // members)


@torch.no_grad()
def evaluate_members(
    model: nn.Module,
    members: int,
    members_first: bool,
    x: Tensor,
    y: Tensor,
) -> list[dict[str, float]]:
    """Each member's accuracy and mean cross-entropy on ``(x, y)`` (the same test set
    for all), in eval mode; for real targets the mean squared error alone (what
    :func:`covshift.training.evaluate` gives one network)."""
    was_training = model.training
    model.eval()
    regression = y.is_floating_point()
    correct = torch.zeros(members, dtype=torch.int64, device=x.device)
    loss = torch.zeros(members, dtype=torch.float64, device=x.device)
    chunk = _eval_chunk(members, members_first)
    try:
        for start in range(0, len(x), chunk):
            xc, yc = x[start : start + chunk], y[start : start + chunk]
            n = len(xc)
            inputs = xc.unsqueeze(0).expand(members, *xc.shape)
            if not members_first:
                inputs = xc.unsqueeze(1).expand(n, members, *xc.shape[1:])
            out = model(inputs)  # (K, n, outputs)
            if regression:
                loss += (out - yc).pow(2).flatten(2).sum(dim=2).mean(dim=1).double() * n
                continue
            correct += (out.argmax(dim=2) == yc).sum(dim=1)
            per_example = F.cross_entropy(
                out.reshape(members * n, -1), yc.repeat(members), reduction="none"
            )
            loss += per_example.view(members, n).sum(dim=1).double()
    finally:
        model.train(was_training)
    losses = (loss / len(x)).tolist()
    if regression:
        return [{"test_loss": v} for v in losses]
    accuracies = (correct.double() / len(x)).tolist()
    return [{"test_accuracy": a, "test_loss": v} for a, v in zip(accuracies, losses, strict=True)]


def evaluate_each(
    stacked: StackedModel,
    own_network: Callable[[int], nn.Module],
    members: Iterable[int],
    x: Tensor,
    y: Tensor,
) -> dict[int, dict[str, float]]:
    """Each listed member's evaluation on ``(x, y)``: how batched members are evaluated,
    in training (:mod:`covshift.batched.trainer`) and in the planner's timings
    (:mod:`covshift.experiments.member_costs`) alike.

    Fully connected members evaluate in one batched forward (:func:`evaluate_members`).
    Convolutional members evaluate one at a time, each its own network
    (``own_network(k)``, up to date with the batch) through the one-at-a-time path's
    :func:`~covshift.training.evaluate`: K plain convolutions over the test images cost
    1.5 to 4.2 times less than one grouped convolution of K groups
    (``benchmarks/member_eval.py``), and their numbers are the one-at-a-time
    evaluation's own.
    """
    members = list(members)
    if stacked.members_first:
        metrics = evaluate_members(stacked.model, stacked.members, True, x, y)
        return {k: metrics[k] for k in members}
    return {k: evaluate(own_network(k), x, y) for k in members}
