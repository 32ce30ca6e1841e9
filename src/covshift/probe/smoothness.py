"""Loss-landscape smoothness along the gradient (Santurkar et al. 2018, Sec. 3.1, Fig. 4).

At weights ``x`` with loss ``L`` and gradient ``g = grad L(x)`` on a batch ``B``,
move along the gradient, ``x_eta = x - eta g``, for step sizes ``eta`` on a grid
``eta_1 < ... < eta_K`` (default: 8 evenly spaced values in ``[0.5, 4] x lr``, the
paper's range for VGG), and report, on the same batch::

    loss range              max_k L(x_eta_k) - min_k L(x_eta_k)             (Lipschitzness)
    gradient predictiveness max_k ||g(x_eta_k) - g(x)||_2
    effective beta-smoothness max_k ||g(x_eta_k) - g(x)||_2 / ||x_eta_k - x||_2
                              = max_k ||g(x_eta_k) - g(x)||_2 / (eta_k ||g(x)||_2)

over all trainable parameters together. Smaller is smoother; Santurkar et al. find
BatchNorm networks much smoother. The loss range is over the grid points (the
current point ``x`` itself is not among them unless the grid contains 0).

Evaluated on a deep copy, in the model's current mode, with the same dropout masks
for every point and the global random state restored: no side effect on training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covshift.probe._copies import Evaluator, LossFn, deep_copy, isolated_randomness
from covshift.probe.monitor import TrainingMonitor
from covshift.probe.record import ProbeRecord

__all__ = ["Smoothness", "SmoothnessMonitor", "landscape_smoothness"]


@dataclass(frozen=True)
class Smoothness:
    """The three figures and the curves they come from (``K`` step sizes)."""

    loss_range: float
    grad_predictiveness: float
    beta_smoothness: float
    loss: float  # L(x)
    grad_norm: float  # ||g(x)||
    step_sizes: np.ndarray  # (K,) eta_k
    losses: np.ndarray  # (K,) L(x_eta_k)
    grad_changes: np.ndarray  # (K,) ||g(x_eta_k) - g(x)||

    def stats(self) -> dict[str, np.ndarray]:
        """As the stats of a :class:`~covshift.probe.ProbeRecord`."""
        return {
            "loss_range": np.array(self.loss_range),
            "grad_predictiveness": np.array(self.grad_predictiveness),
            "beta_smoothness": np.array(self.beta_smoothness),
            "loss": np.array(self.loss),
            "grad_norm": np.array(self.grad_norm),
            "step_sizes": self.step_sizes,
            "losses": self.losses,
            "grad_changes": self.grad_changes,
        }


def step_grid(lr: float, step_range: tuple[float, float], points: int) -> np.ndarray:
    """``points`` evenly spaced step sizes ``[lo, hi] x lr``."""
    lo, hi = step_range
    if not (0 < lo <= hi) or points < 1 or not lr > 0:
        raise ValueError(
            f"smoothness needs lr > 0, 0 < step_range[0] <= step_range[1] and points >= 1; "
            f"got lr={lr}, step_range={step_range}, points={points}"
        )
    return np.linspace(lo, hi, points) * lr


def landscape_smoothness(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    *,
    lr: float,
    loss_fn: LossFn = F.cross_entropy,
    step_range: tuple[float, float] = (0.5, 4.0),
    points: int = 8,
) -> Smoothness:
    """Loss range, gradient predictiveness and effective beta-smoothness at the model's
    current weights (see the module docstring); ``lr`` scales ``step_range``.

    Cost: one deep copy of the model and ``1 + points`` forward-backward passes.
    """
    etas = step_grid(lr, step_range, points)
    with isolated_randomness(model) as rewind:
        (copy_model,) = deep_copy(model)
        evaluate = Evaluator(copy_model, inputs, targets, loss_fn, rewind)
        x = [p.detach().clone() for p in evaluate.params]
        loss0, g0 = evaluate()
        g_flat = torch.cat([g.reshape(-1) for g in g0]).double()
        g_norm = g_flat.norm()
        losses, changes = [], []
        for eta in etas:
            moved = [p - float(eta) * g for p, g in zip(x, g0, strict=True)]
            loss, g = evaluate(moved)
            losses.append(loss.double())
            changes.append((torch.cat([t.reshape(-1) for t in g]).double() - g_flat).norm())
    k = len(etas)
    host = torch.stack([loss0.double(), g_norm, *losses, *changes]).cpu().numpy()  # one transfer
    loss_x, norm_x = float(host[0]), float(host[1])
    losses_np, changes_np = host[2 : 2 + k], host[2 + k :]
    ratio = changes_np / (etas * norm_x) if norm_x > 0 else np.zeros_like(changes_np)
    return Smoothness(
        loss_range=float(losses_np.max() - losses_np.min()),
        grad_predictiveness=float(changes_np.max()),
        beta_smoothness=float(ratio.max()),
        loss=loss_x,
        grad_norm=norm_x,
        step_sizes=etas.astype(np.float64),
        losses=losses_np,
        grad_changes=changes_np,
    )


class SmoothnessMonitor(TrainingMonitor):
    """Landscape smoothness as a callback of :func:`covshift.training.train`.

    At each due step it measures on a training batch drawn by a private generator and
    emits one :class:`~covshift.probe.ProbeRecord` with layer ``"(model)"`` and the
    stats of :meth:`Smoothness.stats`. ``lr`` defaults to the optimizer's (first group);
    ``step_range`` and ``points`` are those of :func:`landscape_smoothness`; the other
    arguments are :class:`~covshift.probe.monitor.TrainingMonitor`'s.
    """

    LAYER = "(model)"

    def __init__(
        self,
        *,
        lr: float | None = None,
        step_range: tuple[float, float] = (0.5, 4.0),
        points: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        step_grid(lr or 1.0, step_range, points)  # validate now, not at the first record
        self.lr = lr
        self.step_range = step_range
        self.points = points

    def measure(self, state: Any, inputs: Any, targets: Any) -> list[ProbeRecord]:
        lr = self.lr or float(state.optimizer.param_groups[0]["lr"])
        found = landscape_smoothness(
            state.model,
            inputs,
            targets,
            lr=lr,
            loss_fn=self.loss_fn,
            step_range=self.step_range,
            points=self.points,
        )
        return [ProbeRecord(state.step, self.LAYER, found.stats())]
