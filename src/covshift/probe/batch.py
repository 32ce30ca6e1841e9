"""The probe batch: what is passed to the model at each record, and its checks.

A probe batch is given as a tensor ``(N, ...)``, a tuple of positional arguments, a
mapping of keyword arguments (a Hugging Face batch: ``input_ids``, ``attention_mask``,
``pixel_values``, ...) or a pair ``(args, kwargs)``. Its size ``N`` is the first
dimension of its tensors, which must agree; every recorded layer value must have ``N``
along its first axis too (:meth:`ProbeBatch.check_value`), so that a batch missing
its batch dimension (one ``(3, 32, 32)`` image, which a ``Conv2d`` takes as unbatched)
or a sequence-first layer ``(T, N, E)`` is an error rather than statistics over the
wrong axis.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ProbeBatch", "ProbeBatchError"]


class ProbeBatchError(RuntimeError, ValueError):
    """The probe batch does not fit the model (a RuntimeError, as torch's own shape
    errors are, and a ValueError, as it is a bad argument)."""


def _tensors(value: Any) -> list[tuple[str, torch.Tensor]]:
    """(where, tensor) of every tensor in nested tuples, lists and mappings."""
    if isinstance(value, torch.Tensor):
        return [("", value)]
    if isinstance(value, Mapping):
        return [(f"[{k!r}]{w}", t) for k, v in value.items() for w, t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [(f"[{i}]{w}", t) for i, v in enumerate(value) for w, t in _tensors(v)]
    return []


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    return value


@dataclass(frozen=True)
class ProbeBatch:
    """Positional and keyword arguments of the model's forward, and their size.

    Its tensors, size and first tensor are computed once (the batch is fixed), since
    every recorded value of every record is checked against the size."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: Any) -> ProbeBatch:
        """Read a probe batch in any of the accepted forms (module docstring)."""
        if isinstance(value, ProbeBatch):
            return value
        if isinstance(value, torch.Tensor):
            batch = cls((value,))
        elif isinstance(value, Mapping):
            batch = cls((), dict(value))
        elif (
            isinstance(value, (tuple, list))
            and len(value) == 2
            and isinstance(value[0], (tuple, list))
            and isinstance(value[1], Mapping)
        ):
            batch = cls(tuple(value[0]), dict(value[1]))
        elif isinstance(value, (tuple, list)):
            batch = cls(tuple(value))
        else:
            raise ProbeBatchError(
                "probe_input must be a batch tensor (N, ...), a tuple of positional "
                "arguments, a dict of keyword arguments (e.g. a Hugging Face batch) or "
                f"(args, kwargs); got {type(value).__name__}"
            )
        batch.size  # noqa: B018 - checks that the tensors agree on N
        return batch

    @functools.cached_property
    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        where = [(f"args{w}", t) for w, t in _tensors(self.args)]
        return where + [(f"kwargs{w}", t) for w, t in _tensors(self.kwargs)]

    @functools.cached_property
    def size(self) -> int:
        """``N``, the first dimension every tensor of the batch shares."""
        found = [(w, t) for w, t in self.tensors if t.dim() >= 1]
        if not any(t.dim() >= 2 for _, t in found):
            raise ProbeBatchError(
                "probe_input must be a batch tensor of shape (N, ...) with N >= 2 examples "
                f"(or arguments holding one), got {self.describe()}"
            )
        sizes = {int(t.shape[0]) for _, t in found}
        if len(sizes) > 1:
            raise ProbeBatchError(
                "the tensors of probe_input disagree on the batch size (their first "
                f"dimension): {self.describe()}"
            )
        (n,) = sizes
        if n < 2:
            raise ProbeBatchError(
                f"probe_input must hold a batch of N >= 2 examples, got {self.describe()}"
            )
        return n

    @functools.cached_property
    def first(self) -> torch.Tensor:
        return self.tensors[0][1]

    def describe(self) -> str:
        """``args[0] (1000, 784) float32, kwargs['mask'] (1000, 16) int64``."""
        parts = [
            f"{w} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for w, t in self.tensors
        ]
        return ", ".join(parts) or "no tensors"

    def to(self, device: torch.device) -> ProbeBatch:
        return ProbeBatch(_move(self.args, device), _move(self.kwargs, device))

    def __call__(self, model: nn.Module) -> Any:
        """The model's forward on this batch."""
        return model(*self.args, **self.kwargs)

    def check_value(self, key: str, record: str, value: torch.Tensor) -> None:
        """A recorded value must hold the batch's N examples along its first axis."""
        n = self.size
        if value.dim() < 2 or value.shape[0] != n:
            raise ProbeBatchError(
                f"probe: the {record} of layer {key!r} has shape {tuple(value.shape)}, but "
                f"the probe batch has N = {n} examples along its first axis "
                f"({self.describe()}); covshift takes the first axis of every recorded "
                "value as the examples. If probe_input is a single example, add its batch "
                "dimension (x.unsqueeze(0); better, pass N >= 2 examples); a "
                "sequence-first layer (T, N, E) needs a batch-first model"
            )
