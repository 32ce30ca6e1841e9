"""The probe batch's forward: through the training model itself, changing nothing.

A probe-batch record on the training thread runs the fixed batch through the model
being trained (not a copy; the background worker uses a snapshot instead, see
:mod:`~covshift.probe.background`), under ``no_grad``, with the probe's taps attached
for that one forward. Training must go on as if the record had not been taken:

- the model's mode is set for the record (``mode="eval"``: running statistics, no
  noise) and put back after it, module by module (a layer the user froze in eval
  mode stays so);
- with ``mode="eval"``, a norm layer whose running statistics have seen no batch yet
  normalizes with the probe batch's own statistics, as the network computes
  (:mod:`~covshift.probe.norm_stats`): its buffers are restored after the forward,
  and the forward runs in a forked random state;
- with ``mode="train"`` (norms use the batch's own statistics, noise layers draw),
  every buffer (running statistics, counters) is restored after the forward, and the
  noise is drawn from a forked random state, so that the training steps after the
  record draw what they would have drawn without it;
- the taps are removed, whatever happens.

An exception of the model's forward is turned into the probe's message (which module
rejected the batch, and the shape it expects: :mod:`~covshift.probe.explain`); the
probe's own errors (a batch whose size does not fit, a unit axis that does not
exist) pass as they are.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from covshift.probe._copies import isolated_randomness
from covshift.probe.batch import ProbeBatch, ProbeBatchError
from covshift.probe.explain import explain_failure
from covshift.probe.hooks import Taps
from covshift.probe.norm_stats import batch_statistics, untrained_norms
from covshift.probe.units import UnitAxisError

__all__ = ["model_device", "probe_forward"]


def model_device(model: nn.Module, default: torch.device) -> torch.device:
    """The device of the model's first parameter (or buffer); ``default`` for a model
    that has neither."""
    first = next(model.parameters(), None)
    if first is None:
        first = next(model.buffers(), None)
    return first.device if first is not None else default


@torch.no_grad()
def probe_forward(
    model: nn.Module, batch: ProbeBatch, mode: str, taps: Taps, *, local: bool = True
) -> int:
    """Run ``batch`` through ``model`` in ``mode`` (``"eval"`` or ``"train"``) with
    ``taps`` attached, leaving the model's modes, buffers and the random state as they
    were. ``local``: the probe keeps its statistics per rank (no collectives).

    Returns the number of norm layers that normalized the batch with its own
    statistics because their running statistics had seen no batch (eval mode; 0 in
    train mode, where every norm does).
    """
    modes = [(m, m.training) for m in model.modules()]
    fresh = untrained_norms(model) if mode == "eval" else []
    saved = [b.detach().clone() for b in model.buffers()] if mode == "train" else []
    try:
        model.train(mode == "train")
        with batch_statistics(fresh, local):
            taps.attach()
            try:
                # Noise layers draw in train mode: from a forked random state (CPU and
                # every CUDA device of the model), so the training steps after a record
                # draw what they would without it.
                isolate = mode == "train" or bool(fresh)
                forked = isolated_randomness(model) if isolate else contextlib.nullcontext()
                with forked:
                    batch(model)
            except (ProbeBatchError, UnitAxisError):
                raise
            except Exception as error:  # torch raises RuntimeError, IndexError, ValueError, ...
                raise explain_failure(model, batch, error) from error
    finally:
        for buffer, value in zip(model.buffers(), saved, strict=False):
            buffer.copy_(value)  # running statistics and counters, as before the record
        model.train(modes[0][1])  # the model's own train() (overrides run), then
        for module, was_training in modes:  # each module's flag as it was
            module.training = was_training
        taps.remove()
    return len(fresh)
