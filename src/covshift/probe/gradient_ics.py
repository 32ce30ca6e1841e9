"""Gradient-based internal covariate shift (Santurkar et al. 2018, Sec. 2.2, Def. 2.1).

For layer ``i`` at a training step, with ``W`` the current weights and ``B`` a batch::

    G_i  = grad_{W_i} L(W_1,  ..., W_{i-1},  W_i, ..., W_k; B)
    G'_i = grad_{W_i} L(W'_1, ..., W'_{i-1}, W_i, ..., W_k; B)

where ``W'_j`` are the weights after this step's update of the earlier layers, by the
user's own optimizer (SGD, momentum, Adam, weight decay, ...) from the gradients
``G`` on ``B``. Reported: ``||G_i - G'_i||_2`` and ``cos(G_i, G'_i)``; no shift means
0 and 1. Santurkar et al. find that BatchNorm does not reduce it.

Choices, written down:

- a *layer* is a module that owns a parameter with two or more dimensions (Linear,
  Conv, attention projections, embeddings); ``W_i`` is all of that module's own
  parameters (weight and bias together);
- *earlier* means called earlier in the forward (found by hooks on the copy); a
  module the forward does not call directly (the ``out_proj`` of
  ``nn.MultiheadAttention``) sits with its closest called ancestor; parameters owned
  by the root module count as earliest;
- the update is computed on ``B`` itself, applied to a deep copy of the model and
  optimizer (the real optimizer state, e.g. momentum buffers, is used and not
  touched); every forward of the measurement sees the same dropout masks, and the
  global random state is restored: training after a measured step is bitwise what
  it is without the measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covshift.probe._copies import Evaluator, LossFn, deep_copy, isolated_randomness
from covshift.probe.monitor import TrainingMonitor
from covshift.probe.record import ProbeRecord
from covshift.probe.select import LayerSpec, select_layers

__all__ = ["GradientICS", "GradientICSMonitor", "gradient_ics"]


@dataclass(frozen=True)
class GradientICS:
    """Gradient ICS of one layer: ``l2 = ||G - G'||``, ``cos = cos(G, G')``, and the
    norms of ``G`` and ``G'``."""

    l2: float
    cos: float
    grad_norm: float
    shifted_grad_norm: float

    def stats(self) -> dict[str, np.ndarray]:
        """As the stats of a :class:`~covshift.probe.ProbeRecord` (0-d arrays)."""
        return {
            "grad_ics_l2": np.array(self.l2),
            "grad_ics_cos": np.array(self.cos),
            "grad_norm": np.array(self.grad_norm),
            "shifted_grad_norm": np.array(self.shifted_grad_norm),
        }


def _weight_layers(
    model: nn.Module, layers: LayerSpec | Sequence[LayerSpec] | None
) -> dict[str, nn.Module]:
    candidates = (
        dict(model.named_modules()) if layers is None else select_layers(model, layers).modules
    )
    chosen = {
        name: m
        for name, m in candidates.items()
        if any(p.requires_grad for p in m.parameters(recurse=False))
        and (layers is not None or any(p.dim() >= 2 for p in m.parameters(recurse=False)))
    }
    if not chosen:
        raise ValueError(
            f"gradient ICS: no module with its own trainable parameters among layers={layers!r} "
            f"of {type(model).__name__}"
        )
    return chosen


def _call_order(model: nn.Module) -> tuple[dict[str, int], Callable[[], None]]:
    """Hooks that number every module by its first call; returns (order, remove)."""
    order: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():

        def first_call(m: nn.Module, args: Any, name: str = name) -> None:
            order.setdefault(name, len(order))

        handles.append(module.register_forward_pre_hook(first_call))

    def remove() -> None:
        for h in handles:
            h.remove()

    return order, remove


def _positions(model: nn.Module, order: dict[str, int]) -> dict[str, float]:
    """Forward position of every module: its first call, or its closest called
    ancestor's (uncalled modules without one go last)."""
    positions: dict[str, float] = {}
    for name, _ in model.named_modules():
        probe = name
        while probe not in order and probe:
            probe = probe.rpartition(".")[0]
        positions[name] = order.get(probe, float("inf"))
    return positions


@torch.no_grad()
def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    denom = a.norm() * b.norm()
    return torch.where(denom > 0, (a * b).sum() / denom.clamp_min(1e-30), torch.ones_like(denom))


def gradient_ics(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Any,
    targets: Any,
    *,
    loss_fn: LossFn = F.cross_entropy,
    layers: LayerSpec | Sequence[LayerSpec] | None = None,
) -> dict[str, GradientICS]:
    """Gradient ICS of every layer on the batch ``(inputs, targets)``; no side effects.

    Args:
        model: the model at its current weights, in the mode training uses.
        optimizer: the optimizer that trains it (its type, settings and state make
            the update; a deep copy is stepped).
        inputs: the model's input (a tuple is passed as positional arguments, a dict
            as keyword arguments, e.g. a Hugging Face batch with its ``labels``).
        targets: second argument of ``loss_fn`` (may be None when the model computes
            its own loss: ``loss_fn=lambda out, _: out.loss``).
        loss_fn: ``loss_fn(model(*inputs), targets)`` -> scalar loss.
        layers: which layers (patterns/types, see :mod:`covshift.probe.select`);
            default: every module owning a parameter of two or more dimensions.

    Returns:
        layer name -> :class:`GradientICS`, in forward order. Cost: one deep copy of
        model and optimizer and ``1 + len(layers)`` forward-backward passes.
    """
    with isolated_randomness(model) as rewind:
        copy_model, copy_opt = deep_copy(model, optimizer)
        evaluate = Evaluator(copy_model, inputs, targets, loss_fn, rewind)
        params = evaluate.params
        chosen = _weight_layers(copy_model, layers)
        order, remove = _call_order(copy_model)
        try:
            before = [p.detach().clone() for p in params]
            _, grads = evaluate()
        finally:
            remove()
        positions = _positions(copy_model, order)
        owner: dict[int, float] = {}
        for name, module in copy_model.named_modules():
            for p in module.parameters(recurse=False):
                owner[id(p)] = min(owner.get(id(p), float("inf")), positions[name])
        # The step of this batch, by the real optimizer's rule and state (on the copy).
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        type(copy_opt).step(copy_opt)  # class method: an instance-patched step (LR
        after = [p.detach().clone() for p in params]  # schedulers) could reach the original
        index = {id(p): k for k, p in enumerate(params)}
        ordered = sorted(chosen, key=lambda n: positions[n])
        rows: list[torch.Tensor] = []
        for name in ordered:
            pos = positions[name]
            mine = [index[id(p)] for p in chosen[name].parameters(recurse=False) if id(p) in index]
            earlier = [owner[id(p)] < pos for p in params]
            if any(earlier):
                mixed = [a if e else b for a, b, e in zip(after, before, earlier, strict=True)]
                _, shifted = evaluate(mixed)
            else:
                shifted = grads  # nothing before this layer moves: G' = G
            g = torch.cat([grads[k].reshape(-1) for k in mine]).double()
            g2 = torch.cat([shifted[k].reshape(-1) for k in mine]).double()
            rows.append(torch.stack([(g - g2).norm(), _cosine(g, g2), g.norm(), g2.norm()]))
    table = torch.stack(rows).cpu().numpy()  # one host transfer
    return {name: GradientICS(*map(float, row)) for name, row in zip(ordered, table, strict=True)}


class GradientICSMonitor(TrainingMonitor):
    """Gradient ICS as a callback of :func:`covshift.training.train`, on a schedule.

    At each due step (after the optimizer step, so at the weights the next step
    starts from), it measures on a training batch drawn by a private generator (the
    loop's batches and random stream are untouched) and emits one
    :class:`~covshift.probe.ProbeRecord` per layer with stats ``grad_ics_l2``,
    ``grad_ics_cos``, ``grad_norm`` and ``shifted_grad_norm`` (0-d arrays).

    Args:
        layers: which layers (default: every weight layer).
        every / steps / schedule, loss_fn, batch_size, seed, sink: see
            :class:`~covshift.probe.monitor.TrainingMonitor`.
    """

    def __init__(
        self, *, layers: LayerSpec | Sequence[LayerSpec] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.layers = layers

    def measure(self, state: Any, inputs: Any, targets: Any) -> list[ProbeRecord]:
        found = gradient_ics(
            state.model, state.optimizer, inputs, targets, loss_fn=self.loss_fn, layers=self.layers
        )
        return [ProbeRecord(state.step, layer, ics.stats()) for layer, ics in found.items()]
