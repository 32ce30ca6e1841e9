"""How much BatchNorm's batch statistics fluctuate from batch to batch.

Shen, Yao, Gholami, Mahoney & Keutzer 2020 (PowerNorm, ICML, arXiv 2003.07845) trace
BatchNorm's failure in NLP Transformers to batch statistics that fluctuate strongly
throughout training. This measures that fluctuation at fixed weights: ``K`` training
batches through a deep copy of the model in train mode (the real model, its running
statistics and the random state untouched), and for every BatchNorm layer (any kind
of covshift.nn's registry with batch statistics, or torch.nn's) the per-channel batch
mean ``μ_kc`` and biased variance ``v_kc`` of its input over the ``n`` values each
statistic pools (the batch, and the tokens or positions). With ``V_c = mean_k v_kc``:

- ``design_effect = n · Σ_c var_k(μ_kc) / Σ_c V_c``: the variance of a batch mean
  relative to what ``n`` independent values would give it (``V / n``); 1 for
  independent values, more where the values of a batch are correlated (the tokens of
  one sequence, the positions of one image): the batch's statistic then rests on
  ``n / design_effect`` values' worth of information;
- ``mean_sd = sqrt(Σ_c var_k(μ_kc) / Σ_c V_c)``: the standard deviation of a batch
  mean in units of the channel's standard deviation (what BatchNorm subtracts moves by
  this much from batch to batch);
- ``var_cv = sqrt(Σ_c var_k(v_kc) / Σ_c V_c²)``: the relative fluctuation of the
  batch variance (what BatchNorm divides by).

Sums over channels, not means of per-channel ratios, so that a channel whose variance
is nearly 0 cannot dominate; ``var_k`` has ``K - 1`` degrees of freedom.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from covshift.nn import registry
from covshift.probe._copies import deep_copy, draw_batch, isolated_randomness
from covshift.probe.monitor import TrainingMonitor
from covshift.probe.record import ProbeRecord

__all__ = ["BATCH_STATS", "BatchStatsMonitor", "batch_statistics_fluctuation"]

BATCH_STATS = {  # metric name -> stored statistic
    "design_effect": "bn_design_effect",
    "mean_sd": "bn_mean_sd",
    "var_cv": "bn_var_cv",
}


def _batch_norms(model: nn.Module) -> dict[str, nn.Module]:
    kinds = registry.batch_kinds()
    return {
        name: m
        for name, m in model.named_modules()
        if registry.norm_kind(m) in kinds or isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def batch_statistics_fluctuation(
    model: nn.Module, batches: list[Any]
) -> dict[str, dict[str, float]]:
    """The fluctuation figures (module docstring) of every BatchNorm layer of
    ``model`` over ``batches`` (each what the model is called with), in module order;
    ``{}`` when it has none.

    Raises:
        ValueError: fewer than two batches (no variance between batches).
    """
    if len(batches) < 2:
        raise ValueError(
            f"batch statistics fluctuation needs 2 or more batches, got {len(batches)}"
        )
    with isolated_randomness(model):
        (copy,) = deep_copy(model)
        norms = _batch_norms(copy)
        if not norms:
            return {}
        copy.train()
        seen: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {n: [] for n in norms}

        def hook(name: str) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0].detach()
                dims = (0, *range(2, x.dim()))
                xf = x.double()
                mean = xf.mean(dims)  # (C,)
                var = xf.var(dims, unbiased=False)  # (C,)
                seen[name].append((mean, var, x.numel() // x.shape[1]))

            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in norms.items()]
        try:
            with torch.no_grad():
                for inputs in batches:
                    copy(inputs)
        finally:
            for h in handles:
                h.remove()
    out = {}
    for name, rows in seen.items():
        if len(rows) < 2:
            continue  # a BatchNorm the forward never calls
        mu = torch.stack([r[0] for r in rows])  # (K, C)
        v = torch.stack([r[1] for r in rows])  # (K, C)
        n = rows[0][2]
        pooled = v.mean(0)  # V_c
        between = mu.var(0, unbiased=True)  # var_k(μ_kc)
        total = pooled.sum()
        figures = torch.stack(
            [
                n * between.sum() / total,
                (between.sum() / total).sqrt(),
                (v.var(0, unbiased=True).sum() / (pooled * pooled).sum()).sqrt(),
            ]
        )
        values = figures.cpu().numpy()
        out[name] = {k: float(x) for k, x in zip(BATCH_STATS, values, strict=True)}
    return out


class BatchStatsMonitor(TrainingMonitor):
    """:func:`batch_statistics_fluctuation` as a callback of :func:`covshift.training.train`:
    at each due step, over ``batches`` private training batches (drawn by their own
    generator, so the loop's batches are untouched), one
    :class:`~covshift.probe.ProbeRecord` per BatchNorm layer with the 0-d stats
    ``bn_design_effect``, ``bn_mean_sd`` and ``bn_var_cv``; nothing for a model
    without BatchNorm.

    Args:
        batches: training batches per measurement (>= 2).
        every / steps / schedule, batch_size, seed, sink: see
            :class:`~covshift.probe.monitor.TrainingMonitor`.
    """

    def __init__(self, *, batches: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 2:
            raise ValueError(
                f"batches must be an int >= 2 (batches per measurement), got {batches!r}"
            )
        self.batches = batches

    def on_step_end(self, state: Any) -> None:
        if not self.schedule.due(state.step):
            return
        drawn = [
            draw_batch(state, self.batch_size, self.seed + 7919 * (k + 1), state.step)[0]
            for k in range(self.batches)
        ]
        found = batch_statistics_fluctuation(state.model, drawn)
        for layer, figures in found.items():
            stats = {BATCH_STATS[k]: np.array(v) for k, v in figures.items()}
            self._sink(ProbeRecord(state.step, layer, stats))
