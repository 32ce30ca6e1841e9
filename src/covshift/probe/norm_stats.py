"""Norm layers whose running statistics have seen no batch yet: probed with the probe
batch's own statistics.

An eval-mode record normalizes with the running statistics. Before the first training
batch those are their initial values, mean 0 and variance 1, which the network never
computes with: in training it normalizes every batch with the batch's own statistics,
and its running statistics only become meaningful once they have followed some
batches. Probing through them at step 0 measures an arbitrary affine map of each
unit's input (at init std 3 that alone reads as a drift of 4 to 10 by the end of
training). So, in an eval-mode record, a norm layer that

- keeps running statistics (``running_mean`` and ``running_var`` are tensors and
  ``track_running_stats`` is not False: torch.nn's BatchNorm*, InstanceNorm* with
  tracking, SyncBatchNorm, and covshift.nn's BatchNorm, Batch Renorm, Ghost BN,
  SyncBatchNorm, the norm inside a NoisyNorm: found by these attributes, not by class),
- has counted no training batch (``num_batches_tracked == 0``, where it has a counter),
- and still holds the initial values (``running_mean`` all 0, ``running_var`` all 1;
  a model loaded from a checkpoint that lacks the counter has it at 0 but holds
  real statistics, and is probed through them)

runs its *training* forward on the probe batch: the batch's own statistics, per
virtual batch for Ghost BN, with Batch Renorm's correction at its counter's limits.
Only that layer is switched: noise layers (NoisyNorm's noise, dropout) stay in eval
mode and draw nothing. The layer's buffers (running statistics, counter) and training
flag are put back after the forward, and the record is taken inside a forked random
state, so that training goes on bitwise as without the record.

SyncBatchNorm (a norm with a ``process_group`` attribute, while torch.distributed is
initialized): when the probe reduces its statistics across ranks, every rank takes
the record at the same step, and the layer's training forward shares the batch
statistics of all ranks' probe shards, as training does. When it does not reduce,
ranks may record alone, so the layer is normalized with the local shard's statistics
(``F.batch_norm`` with batch statistics) and no collective runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from covshift.probe.hooks import first_tensor

__all__ = ["batch_statistics", "keeps_running_statistics", "untrained_norms"]


def keeps_running_statistics(module: nn.Module) -> bool:
    """Whether ``module`` normalizes with running statistics in eval mode."""
    mean = getattr(module, "running_mean", None)
    var = getattr(module, "running_var", None)
    tracking = getattr(module, "track_running_stats", True)
    return isinstance(mean, Tensor) and isinstance(var, Tensor) and tracking is not False


def _untouched(module: nn.Module) -> Tensor:
    """0-d bool on the module's device: no batch counted and the initial values held."""
    flag = (module.running_mean == 0).all() & (module.running_var == 1).all()
    counter = getattr(module, "num_batches_tracked", None)
    if isinstance(counter, Tensor):
        flag = flag & (counter == 0).all()
    return flag


def untrained_norms(model: nn.Module) -> list[nn.Module]:
    """The norm layers of ``model`` whose running statistics have seen no batch (see
    the module docstring), in module order. One host read per device holding norms."""
    norms = [m for m in model.modules() if keeps_running_statistics(m)]
    if not norms:
        return []
    flags = [_untouched(m) for m in norms]
    by_device: dict[torch.device, list[int]] = {}
    for i, flag in enumerate(flags):
        by_device.setdefault(flag.device, []).append(i)
    fresh = [False] * len(norms)
    for indices in by_device.values():
        host = torch.stack([flags[i] for i in indices]).tolist()
        for i, value in zip(indices, host, strict=True):
            fresh[i] = bool(value)
    return [m for m, f in zip(norms, fresh, strict=True) if f]


def _synchronizes(module: nn.Module) -> bool:
    """A SyncBatchNorm-like layer in a torch.distributed job (its training forward
    would run a collective)."""
    return hasattr(module, "process_group") and dist.is_available() and dist.is_initialized()


def _local_batch_norm(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
    """Forward hook: the output recomputed with the input's own statistics, locally."""
    x = first_tensor(args)
    assert x is not None
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, module.eps)


@contextlib.contextmanager
def batch_statistics(norms: list[nn.Module], local: bool) -> Iterator[None]:
    """Inside: each of ``norms`` normalizes with its input's own statistics, as in its
    training forward (a synchronizing one with the local shard's when ``local``). On
    exit every buffer of theirs holds its object and values from before, and their
    training flags are restored."""
    saved = [
        (m, m.training, [(n, b, b.detach().clone()) for n, b in m.named_buffers(recurse=False)])
        for m in norms
    ]
    hooks = []
    try:
        for m in norms:
            if local and _synchronizes(m):
                # Kept in eval mode (no collective); its output replaced, before any
                # other hook (the probe's taps) sees it.
                hooks.append(m.register_forward_hook(_local_batch_norm, prepend=True))
            else:
                m.training = True  # this module only: its children (none for a norm) keep theirs
        yield
    finally:
        for handle in hooks:
            handle.remove()
        with torch.no_grad():
            for m, was_training, buffers in saved:
                m.training = was_training
                for name, original, value in buffers:
                    original.copy_(value)
                    m._buffers[name] = original  # a forward that rebinds a buffer
