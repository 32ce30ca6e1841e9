"""One member of a batched run: what its one-at-a-time run would hold.

A :class:`Member` owns the member's own network and ``torch.optim.SGD`` (kept in step
with the batched model whenever something reads them: a probe record, an evaluation,
a checkpoint, the end), its batch sampler, its random stream (the generator its noisy
layers draw from, in the state the one-at-a-time run's global generator would be in),
its evaluation history and its callbacks. Its checkpoint is the one-at-a-time run's
format, written through its own :class:`~covshift.checkpoints.Checkpointer`, so either
path resumes the other's state.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from covshift.checkpoints import Checkpointer, CheckpointOwnerError
from covshift.data import BatchSampler, Dataset
from covshift.store.errors import StoreError
from covshift.train_checkpoint import checkpoint_payload
from covshift.training import TrainConfig, TrainState

__all__ = ["Member", "MemberRun"]


@dataclass
class MemberRun:
    """A member as the caller gives it.

    Attributes:
        model: its network, built as its one-at-a-time run builds it.
        config: its training settings (steps, batch size and evaluation interval are
            the batch's; learning rate, momentum, weight decay and seed its own).
        callbacks: its callbacks, in the order its one-at-a-time run has them (their
            saved states are keyed by position).
        checkpoint: where its resumable state lives (resumed when one is there).
        rng_seed: the seed of its random stream (the global generator's seed in its
            one-at-a-time run).
        name: how it is named in messages and in the batch it is recorded with.
    """

    model: nn.Module
    config: TrainConfig
    callbacks: Sequence[object] = ()
    checkpoint: Checkpointer | None = None
    rng_seed: int = 0
    name: str = ""


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@dataclass
class Member:
    """The live state of one member in the batched loop."""

    run: MemberRun
    state: TrainState
    sampler: BatchSampler
    cpu_generator: torch.Generator
    device_generator: torch.Generator | None
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    payload: dict[str, Any] | None = None  # the checkpoint it resumes from
    active: bool = True
    error: BaseException | None = None
    error_trace: str | None = None
    # A copy of a member left alone at its step, trained beside it and recorded nowhere
    # (:func:`covshift.batched.trainer.train_members`): no callbacks, no checkpoint.
    companion: bool = False

    @classmethod
    def start(cls, run: MemberRun, data: Dataset, device: torch.device) -> Member:
        model = run.model.to(device).train()
        c = run.config
        optimizer = torch.optim.SGD(
            model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
        )
        cpu = torch.Generator().manual_seed(run.rng_seed)
        on_device = (
            torch.Generator(device=device).manual_seed(run.rng_seed)
            if device.type == "cuda"
            else None
        )
        state = TrainState(model, optimizer, data, c, device)
        sampler = BatchSampler(len(data.x_train), c.batch_size, c.seed)
        return cls(run, state, sampler, cpu, on_device)

    def companion_copy(self) -> Member:
        """A companion for this member: its network, settings, random stream and
        checkpoint to resume from (the one :meth:`peek` read), with no callbacks and
        no checkpoint of its own, so that it trains to the same numbers and records
        nothing."""
        run = MemberRun(
            copy.deepcopy(self.state.model),
            self.run.config,
            rng_seed=self.run.rng_seed,
            name=f"{self.run.name} (companion)",
        )
        twin = Member.start(run, self.state.data, self.state.device)
        twin.payload = self.payload
        twin.companion = True
        return twin

    @property
    def generator(self) -> torch.Generator:
        """The generator its layers draw from (on the training device)."""
        return self.device_generator or self.cpu_generator

    # -- resuming -------------------------------------------------------------------
    def peek(self) -> int:
        """Read its checkpoint (if any); the step it resumes after (0: a fresh start)."""
        keeper = self.run.checkpoint
        if keeper is None:
            return 0
        try:
            self.payload = keeper.load(self.state.device)
        except (CheckpointOwnerError, StoreError):
            raise  # whose state it is, or which file could not be read, and what to do
        except Exception as e:
            raise ValueError(
                f"checkpoint {keeper} cannot be read: {e}; delete it to start over"
            ) from None
        return 0 if self.payload is None else int(self.payload["step"])

    def resume(self) -> bool:
        """Restore the state :meth:`peek` read, as :func:`covshift.training.train` does;
        False when there is none."""
        payload = self.payload
        if payload is None:
            return False
        s = self.state
        try:
            s.model.load_state_dict(payload["model"])
            s.optimizer.load_state_dict(payload["optimizer"])
        except Exception as e:
            raise ValueError(
                f"checkpoint {self.run.checkpoint} cannot be resumed for this model: {e}; "
                "delete it to start over"
            ) from None
        self.sampler.load_state_dict(payload["sampler"])
        self.cpu_generator.set_state(payload["cpu_rng"].cpu())
        saved_cuda = payload.get("cuda_rng")
        if self.device_generator is not None and saved_cuda is not None:
            self.device_generator.set_state(saved_cuda[_cuda_index(s.device)].cpu())
        s.step = int(payload["step"])
        s.outcome, s.outcome_step = payload.get("outcome", (None, None))
        saved = payload.get("callbacks", {})
        for i, cb in enumerate(self.run.callbacks):
            key = f"{i}:{type(cb).__qualname__}"
            if key in saved and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(saved[key])
        self.history = dict(payload["history"])
        self.payload = None
        return True

    def save(self, batch: Sequence[str]) -> None:
        """Its checkpoint, in the one-at-a-time run's format (plus the names of the
        members it trains with, so that a resumed batch can be formed again)."""
        keeper = self.run.checkpoint
        if keeper is None:
            return
        s = self.state
        cuda: list[torch.Tensor] | None = None
        if torch.cuda.is_available():
            cuda = torch.cuda.get_rng_state_all()
            if self.device_generator is not None:
                cuda[_cuda_index(s.device)] = self.device_generator.get_state()
        # The loop's payload, with this member's own random streams for the global ones.
        payload = checkpoint_payload(s, self.sampler, self.history, self.run.callbacks)
        payload["cpu_rng"] = self.cpu_generator.get_state()
        payload["cuda_rng"] = cuda
        payload["batch"] = list(batch)
        keeper.save(payload)

    # -- its random stream as the global one ------------------------------------------
    @contextlib.contextmanager
    def own_randomness(self) -> Iterator[None]:
        """Inside: the global generator(s) hold this member's stream (what its callbacks
        would see in its one-at-a-time run); what they draw advances the stream; the
        process's own global state is restored on exit."""
        s = self.state
        devices = [_cuda_index(s.device)] if self.device_generator is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_generator.get_state())
            if self.device_generator is not None:
                torch.cuda.set_rng_state(self.device_generator.get_state(), devices[0])
            try:
                yield
            finally:
                self.cpu_generator.set_state(torch.get_rng_state())
                if self.device_generator is not None:
                    self.device_generator.set_state(torch.cuda.get_rng_state(devices[0]))
