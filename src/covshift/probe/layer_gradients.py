"""Per-layer gradient norms, as Xiong et al. 2020 measure them against depth.

Xiong, Yang, He, Zheng, Zheng, Xing, Zhang, Lan, Wang & Liu 2020 (ICML, arXiv
2002.04745), Fig. 3 and Theorem 1: at initialization the gradient of the weights near
the output of a Post-LN Transformer is large (O(d sqrt(ln d)) for the last FFN,
independent of depth) while a Pre-LN Transformer's shrinks with depth (O(d sqrt(ln d /
L))), which is why Post-LN needs a learning-rate warm-up.

For every *weight layer* (a module owning a parameter of two or more dimensions:
Linear, Embedding, attention projections) the Frobenius norm of the loss's gradient
with respect to its weight matrices, ``||∂L/∂W||_F`` (biases left out, as Xiong et
al.'s W), on one training batch, in the mode training uses. Measured on a deep copy
with the global random state restored, so training is untouched (as gradient ICS,
:mod:`covshift.probe.gradient_ics`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covshift.probe._copies import Evaluator, LossFn, deep_copy, isolated_randomness
from covshift.probe.monitor import TrainingMonitor
from covshift.probe.record import ProbeRecord

__all__ = ["GRAD_NORM_STAT", "GradientNormMonitor", "weight_gradient_norms"]

GRAD_NORM_STAT = "weight_grad_norm"  # the stored statistic of a record


def _weight_layers(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Module name -> its own trainable parameters of two or more dimensions, in
    module order (forward order for covshift's builders)."""
    found = {}
    for name, module in model.named_modules():
        weights = [p for p in module.parameters(recurse=False) if p.dim() >= 2 and p.requires_grad]
        if weights:
            found[name] = weights
    return found


def weight_gradient_norms(
    model: nn.Module, inputs: Any, targets: Any, *, loss_fn: LossFn = F.cross_entropy
) -> dict[str, float]:
    """``||∂L/∂W||_F`` of every weight layer of ``model`` on ``(inputs, targets)``
    (module docstring); no side effect on the model, its buffers or the random state.

    Returns:
        module name -> gradient norm, in module order.
    """
    with isolated_randomness(model) as rewind:
        (copy,) = deep_copy(model)
        evaluate = Evaluator(copy, inputs, targets, loss_fn, rewind)
        _, grads = evaluate()
        by_param = {id(p): g for p, g in zip(evaluate.params, grads, strict=True)}
        layers = _weight_layers(copy)
        if not layers:
            raise ValueError(
                f"gradient norms: {type(model).__name__} has no trainable parameter of two "
                "or more dimensions (no Linear, Conv or Embedding weight)"
            )
        norms = torch.stack(
            [
                torch.cat([by_param[id(p)].reshape(-1) for p in params]).double().norm()
                for params in layers.values()
            ]
        )
    values = norms.cpu().numpy()  # one host transfer
    return {name: float(v) for name, v in zip(layers, values, strict=True)}


class GradientNormMonitor(TrainingMonitor):
    """:func:`weight_gradient_norms` as a callback of :func:`covshift.training.train`, at
    the due steps (``steps=[0]``: at initialization, before any update), on a private
    training batch; one :class:`~covshift.probe.ProbeRecord` per weight layer with the
    0-d stat ``weight_grad_norm``.

    Args: ``every`` / ``steps`` / ``schedule``, ``loss_fn``, ``batch_size``, ``seed``,
    ``sink``: see :class:`~covshift.probe.monitor.TrainingMonitor`.
    """

    def measure(self, state: Any, inputs: Any, targets: Any) -> list[ProbeRecord]:
        found = weight_gradient_norms(state.model, inputs, targets, loss_fn=self.loss_fn)
        return [
            ProbeRecord(state.step, layer, {GRAD_NORM_STAT: np.array(value)})
            for layer, value in found.items()
        ]
