"""What a probe session takes from the trainer's own objects, whatever the trainer.

- the probe batch, when none is given: the first training batch, as the trainer
  passes it to the model, copied and cut to its first examples (:func:`first_examples`);
- the torch optimizer inside the trainer's wrapper, which gradient ICS steps a copy of
  (:func:`unwrap_optimizer`);
- whether the model's parameters are sharded across ranks, which a probe forward on
  rank 0 alone cannot work with (:func:`sharded_parameters`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from covshift.probe.batch import ProbeBatch, ProbeBatchError

__all__ = ["first_examples", "sharded_parameters", "unwrap_optimizer"]


def _take(value: Any, size: int, n: int | None) -> Any:
    """Detached copies of the tensors of ``value``, cut to their first ``n`` examples
    along a first axis of length ``size`` (other tensors and values as they are)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if n is not None and value.dim() >= 1 and value.shape[0] == size:
            value = value[:n]
        return value.clone()
    if isinstance(value, Mapping):
        return {k: _take(v, size, n) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, size, n) for v in value)
    return value


def first_examples(
    inputs: Any, targets: Any = None, n: int | None = None
) -> tuple[ProbeBatch, Any]:
    """A fixed probe batch from a training batch: ``inputs`` (any form
    :class:`~covshift.probe.batch.ProbeBatch` accepts) and ``targets``, detached,
    copied (the trainer may reuse its buffers) and cut to the first ``n`` examples."""
    try:
        batch = ProbeBatch.of(inputs)
        size = batch.size
    except ProbeBatchError as error:
        raise ProbeBatchError(
            f"the first training batch cannot serve as the probe batch ({error}); pass "
            "probe_input= (a fixed batch of N >= 2 examples) to the callback"
        ) from None
    cut = ProbeBatch(_take(batch.args, size, n), _take(batch.kwargs, size, n))
    return cut, _take(targets, size, n)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside a trainer's wrapper (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``): gradient ICS steps a
    deep copy of the real one."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def sharded_parameters(model: nn.Module) -> str | None:
    """What shards the model's parameters across ranks (FSDP, DeepSpeed ZeRO-3), if
    anything: a forward of it on rank 0 alone would wait forever for the other ranks'
    shards."""
    for module in model.modules():
        if type(module).__name__ in ("FullyShardedDataParallel", "FSDPModule"):
            return "FSDP"
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            return "DeepSpeed ZeRO-3"
        if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
            return "FSDP2 / DTensor"
    return None
