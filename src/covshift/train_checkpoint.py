"""The training loop's resumable state: what :func:`covshift.training.train` saves at
every evaluation (:func:`save_checkpoint`) and restores when it starts
(:func:`load_checkpoint`): the model, optimizer, sampler and random states, the
evaluation history, the declared outcome and the state of every callback that has
``state_dict``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from covshift.checkpoints import Checkpointer, CheckpointOwnerError
from covshift.data import BatchSampler
from covshift.store.errors import StoreError

if TYPE_CHECKING:
    from covshift.training import TrainState

__all__ = ["checkpoint_payload", "load_checkpoint", "save_checkpoint"]


def _callback_states(callbacks: Sequence[object]) -> dict[str, object]:
    # Keyed by position and class, so a state is only restored into the same callback.
    return {
        f"{i}:{type(cb).__qualname__}": cb.state_dict()  # type: ignore[attr-defined]
        for i, cb in enumerate(callbacks)
        if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict")
    }


def checkpoint_payload(
    state: TrainState,
    sampler: BatchSampler,
    history: dict[int, dict[str, float]],
    callbacks: Sequence[object],
) -> dict[str, object]:
    """What a checkpoint holds: the step, the model's and optimizer's state, the
    sampler's position, the random states, the evaluation history, the declared outcome
    and the state of every callback that has one. The preflight prices the same
    payload (:mod:`covshift.experiments.preflight`)."""
    return {
        "step": state.step,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "sampler": sampler.state_dict(),
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": history,
        "outcome": (state.outcome, state.outcome_step),
        "callbacks": _callback_states(callbacks),
    }


def save_checkpoint(
    keeper: Checkpointer,
    state: TrainState,
    sampler: BatchSampler,
    history: dict[int, dict[str, float]],
    callbacks: Sequence[object],
) -> None:
    """Save :func:`checkpoint_payload` through ``keeper``."""
    keeper.save(checkpoint_payload(state, sampler, history, callbacks))


def load_checkpoint(
    keeper: Checkpointer,
    state: TrainState,
    sampler: BatchSampler,
    callbacks: Sequence[object],
) -> dict[int, dict[str, float]] | None:
    """Restore a saved state into ``state``; returns its history (None: nothing saved)."""
    try:
        payload = keeper.load(state.device)
        if payload is None:
            return None
        state.model.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
    except (CheckpointOwnerError, StoreError):
        raise  # whose state it is, or which file could not be read, and what to do
    except Exception as e:
        raise ValueError(
            f"checkpoint {keeper} cannot be resumed for this model: {e}; delete it to start over"
        ) from None
    sampler.load_state_dict(payload["sampler"])
    torch.set_rng_state(payload["cpu_rng"].cpu())
    if payload["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in payload["cuda_rng"]])
    state.step = int(payload["step"])
    state.outcome, state.outcome_step = payload.get("outcome", (None, None))
    saved = payload.get("callbacks", {})
    for i, cb in enumerate(callbacks):
        key = f"{i}:{type(cb).__qualname__}"
        if key in saved and hasattr(cb, "load_state_dict"):
            cb.load_state_dict(saved[key])
    return dict(payload["history"])
