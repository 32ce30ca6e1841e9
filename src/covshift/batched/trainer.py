"""The batched training loop: ``K`` members as one model, each still its own run.

:func:`train_members` does for every member what :func:`covshift.training.train` does for
one network (the same batches, the same SGD, evaluations at the same steps, the same
callbacks, checkpoints and outcome), with one forward, one backward and one optimizer
step for all of them:

- the batch of step ``t`` is each member's own sampler's draw, gathered into one
  tensor; the loss is each member's own mean (no reduction across members), and their
  sum is backpropagated, so each member's gradient is that of its own loss;
- a member's callbacks see a :class:`~covshift.training.TrainState` of its own, whose
  ``model`` and ``optimizer`` are the member's own network and SGD, brought up to date
  from the batched model whenever a callback's schedule is due, at every evaluation
  and at the end (probe records, gradient ICS and landscape smoothness measure that
  network, so they perturb nothing of the batched training), with the member's random
  stream as the global one;
- a member that diverges (its guard stops it) or whose callback fails ends there, is
  recorded as it would be alone, and drops out: its parameters are zeroed and no
  longer stepped, so the shapes, and every other member's numbers, stay as they were;
- members whose checkpoints stand at different steps train in separate batches, one
  after another, and one left alone at its step trains beside a companion (a copy of
  itself, recorded nowhere), so that its numbers are those of its uninterrupted batch;
  a member whose checkpoint the one-at-a-time loop saved (it has no batch) goes on one
  at a time.

Networks without a batched form (:class:`~covshift.batched.NotBatchable`) train one at
a time through :func:`covshift.training.train`, as before.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from covshift.batched.evaluate import evaluate_each, gather_rows, member_losses
from covshift.batched.member import Member, MemberRun
from covshift.batched.models import StackedModel, stack_models
from covshift.batched.optim import MemberSGD, SGDSettings
from covshift.batched.slots import NotBatchable
from covshift.data import Dataset
from covshift.store.errors import StoreError
from covshift.training import TrainResult, resolve_device, train

__all__ = ["MemberOutcome", "train_members"]


@dataclass(frozen=True)
class MemberOutcome:
    """How a member ended: its result, or the error it failed with (and traceback)."""

    result: TrainResult | None
    error: BaseException | None = None
    trace: str | None = None
    batched: bool = True  # False: trained one at a time (no batched form)


def _check_lockstep(runs: Sequence[MemberRun]) -> None:
    first = runs[0].config
    for run in runs[1:]:
        c = run.config
        if (c.steps, c.batch_size, c.eval_every) != (
            first.steps,
            first.batch_size,
            first.eval_every,
        ):
            raise ValueError(
                "members of one batch must share steps, batch_size and eval_every; "
                f"{run.name or 'a member'} has {(c.steps, c.batch_size, c.eval_every)}, "
                f"the first {(first.steps, first.batch_size, first.eval_every)}"
            )


def train_members(
    runs: Sequence[MemberRun],
    data: Dataset,
    *,
    device: str | torch.device = "auto",
) -> list[MemberOutcome]:
    """Train ``runs`` as one batched model; one :class:`MemberOutcome` per run, in order.

    KeyboardInterrupt (Ctrl-C, a stop request) ends every member as ``interrupted``
    (their callbacks told, their checkpoints kept) and propagates; an error of the
    batched step ends every member as ``failed`` and propagates, as does a
    :class:`~covshift.store.StoreError` met anywhere (a checkpoint or record that
    cannot be written: nobody's failure, and every member stops).
    """
    if not runs:
        return []
    _check_lockstep(runs)
    dev = resolve_device(device)
    data = data if data.x_train.device == dev else data.to(dev)
    members = [Member.start(run, data, dev) for run in runs]
    steps = [m.peek() for m in members]
    outcomes: list[MemberOutcome | None] = [None] * len(runs)
    for i, member in enumerate(members):
        if member.payload is not None and "batch" not in member.payload:
            # Saved by the one-at-a-time loop: it goes on there, so that its numbers
            # are those of the path it started on (the two differ in the last bits).
            member.payload = None
            outcomes[i] = _one_at_a_time(member, data, dev)
            steps[i] = -1
    for start in sorted(set(steps) - {-1}):
        chosen = [i for i, s in enumerate(steps) if s == start]
        group = [members[i] for i in chosen]
        if len(group) == 1 and len(runs) > 1:
            # Alone in a batch of one, a grouped convolution of one group or a
            # BatchNorm over one member's channels round otherwise than in any batch of
            # two or more, where a member's numbers do not depend on its company: a
            # member left alone at its step (its batch's checkpoints stand at
            # different steps, or its own was damaged) trains beside a copy of itself.
            group.append(group[0].companion_copy())
        try:
            done = _BatchedLoop(group, data, dev).run()[: len(chosen)]
        except NotBatchable:
            done = [_one_at_a_time(members[i], data, dev) for i in chosen]
        for i, outcome in zip(chosen, done, strict=True):
            outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


def _one_at_a_time(member: Member, data: Dataset, device: torch.device) -> MemberOutcome:
    """The member through :func:`covshift.training.train`, with its own random stream as
    the global one (as a point trains without batching)."""
    run = member.run
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(run.rng_seed)
        result = train(
            run.model,
            data,
            run.config,
            callbacks=run.callbacks,
            device=device,
            checkpoint=run.checkpoint,
        )
    return MemberOutcome(result, batched=False)


class _BatchedLoop:
    """One batch of members that start at the same step."""

    def __init__(self, members: list[Member], data: Dataset, device: torch.device) -> None:
        for member in members:
            member.resume()
        self.members = members
        self.data = data
        self.device = device
        self.names = [m.run.name for m in members if not m.companion]
        self.stacked: StackedModel = stack_models([m.state.model for m in members])
        self.stacked.use_generators([m.generator for m in members])
        self.param_slots = self.stacked.parameter_slots()
        self.optimizer = MemberSGD(
            [slot.tensor for _, slot in self.param_slots],
            [
                SGDSettings(m.run.config.lr, m.run.config.momentum, m.run.config.weight_decay)
                for m in members
            ],
            [[name in t for t in self.stacked.trainable] for name, _ in self.param_slots],
        )
        for k, m in enumerate(members):
            own = dict(m.state.model.named_parameters())
            for i, (name, _) in enumerate(self.param_slots):
                buf = m.state.optimizer.state.get(own[name], {}).get("momentum_buffer")
                self.optimizer.set_member_buffer(i, k, buf)
        self.schedules = [
            [cb.schedule for cb in m.run.callbacks if hasattr(getattr(cb, "schedule", None), "due")]
            for m in members
        ]
        self.step_hooks = [
            [cb.on_step_end for cb in m.run.callbacks if hasattr(cb, "on_step_end")]
            for m in members
        ]
        self.results: list[MemberOutcome | None] = [None] * len(members)

    # -- keeping each member's own network up to date ------------------------------
    def sync(self, k: int) -> None:
        member = self.members[k]
        self.stacked.copy_out(k, member.state.model)
        config = member.run.config
        if config.scheduled and member.state.step >= 1:
            # the rate its one-at-a-time run's SGD holds after this step (what a
            # gradient-ICS measurement steps with, what a checkpoint saves)
            for group in member.state.optimizer.param_groups:
                group["lr"] = config.lr_at(config.lr, member.state.step)
        own = dict(member.state.model.named_parameters())
        state = member.state.optimizer.state
        for i, (name, _) in enumerate(self.param_slots):
            buf = self.optimizer.member_buffer(i, k)
            if buf is not None:
                state[own[name]]["momentum_buffer"] = buf.view_as(own[name]).clone()

    def call(self, k: int, method: str, *args: object) -> None:
        """``method`` of member ``k``'s callbacks with its state; an exception there
        fails this member alone (Ctrl-C and stop requests propagate)."""
        member = self.members[k]
        try:
            with member.own_randomness():
                for cb in member.run.callbacks:
                    fn = getattr(cb, method, None)
                    if fn is not None:
                        fn(member.state, *args)
        except (KeyboardInterrupt, StoreError):  # not this member's failure: all stop
            raise
        except Exception as e:
            self.fail(k, e)

    def fail(self, k: int, error: Exception) -> None:
        member = self.members[k]
        trace = traceback.format_exc()
        self.drop(k)
        try:
            with member.own_randomness():
                for cb in member.run.callbacks:
                    fn = getattr(cb, "on_train_end", None)
                    if fn is not None:
                        fn(member.state, "failed")
        except Exception:  # already failed: the first error is the one reported
            pass
        self.results[k] = MemberOutcome(None, error, trace)

    def drop(self, k: int) -> None:
        """Member ``k`` leaves the batch: no more steps or records; zeroed parameters
        keep its slot finite without touching anyone else's numbers."""
        self.members[k].active = False
        self.optimizer.drop(k)
        with torch.no_grad():
            for _, slot in self.param_slots:
                slot.member(k, self.stacked.members).zero_()

    def finish(self, k: int) -> None:
        member = self.members[k]
        s = member.state
        status = s.outcome or "finished"
        self.sync(k)
        self.call(k, "on_train_end", status)
        if self.results[k] is not None:  # its on_train_end failed
            return
        if member.run.checkpoint is not None:
            member.run.checkpoint.clear()
        self.drop(k)
        result = TrainResult(member.history, 0.0, s.step, status, s.outcome_step)
        self.results[k] = MemberOutcome(result)

    def active(self) -> list[int]:
        """The members still training, companions left out: a companion is stepped
        with the batch, never evaluated, recorded or saved, and the loop ends when no
        one else is left."""
        return [k for k, m in enumerate(self.members) if m.active and not m.companion]

    # -- the loop -------------------------------------------------------------------
    def run(self) -> list[MemberOutcome]:
        config = self.members[0].run.config
        model = self.stacked.model
        members_first = self.stacked.members_first
        regression = self.data.is_regression
        count = self.stacked.members
        loss_sum = torch.zeros(count, device=self.device)
        self.since_eval = 0
        first_step = self.members[0].state.step + 1
        scheduled = config.scheduled
        try:
            for k in self.active():
                self.sync(k)
                self.call(k, "on_train_start")
            if first_step == 1:
                self.evaluate(loss_sum)
            x_train, y_train = self.data.x_train, self.data.y_train
            for step in range(first_step, config.steps + 1):
                if not self.active():
                    break
                idx = torch.stack([m.sampler.next() for m in self.members]).to(self.device)
                x = gather_rows(x_train, idx if members_first else idx.t())
                losses = member_losses(model(x), gather_rows(y_train, idx), regression)
                self.optimizer.zero_grad()
                losses.sum().backward()
                # the members of a batch share steps, warm-up and decay (batch_key)
                self.optimizer.step(partial(config.lr_at, step=step) if scheduled else None)
                loss_sum += losses.detach()
                self.since_eval += 1
                for k in self.active():
                    self.step_end(k, step, losses[k])
                if step == config.steps or (config.eval_every and step % config.eval_every == 0):
                    self.evaluate(loss_sum)
            for k in self.active():
                self.finish(k)
        except KeyboardInterrupt:
            self.end_all("interrupted")
            raise
        except BaseException:
            self.end_all("failed")
            raise
        return [r if r is not None else MemberOutcome(None) for r in self.results]

    def step_end(self, k: int, step: int, loss: torch.Tensor) -> None:
        member = self.members[k]
        member.state.step, member.state.loss = step, loss
        if any(s.due(step) for s in self.schedules[k]):
            self.sync(k)  # a record reads the member's own network and optimizer
            self.call(k, "on_step_end")
            return
        try:  # no record due: the cheap callbacks (progress, stop requests) only
            for hook in self.step_hooks[k]:
                hook(member.state)
        except (KeyboardInterrupt, StoreError):  # not this member's failure: all stop
            raise
        except Exception as e:
            self.fail(k, e)

    def evaluate(self, loss_sum: torch.Tensor) -> None:
        config = self.members[0].run.config
        metrics = self.members_metrics()
        since = self.since_eval
        sums = loss_sum.tolist() if since else []
        loss_sum.zero_()
        self.since_eval = 0
        stopped = []
        for k in self.active():
            member = self.members[k]
            s = member.state
            m = metrics[k]
            if since:
                m["train_loss"] = sums[k] / since
            member.history[s.step] = m
            s.metrics = m
            if self.stacked.members_first:  # (convolutional members were synced to evaluate)
                self.sync(k)
            self.call(k, "on_eval", m)
            if not member.active:  # a callback failed
                continue
            if s.step < config.steps and not s.stop:
                member.save(self.names)
            if s.stop:
                stopped.append(k)
        for k in stopped:
            self.finish(k)

    def members_metrics(self) -> dict[int, dict[str, float]]:
        """Each active member's evaluation on the test set (:func:`evaluate_each`)."""

        def own_network(k: int) -> torch.nn.Module:
            self.sync(k)
            return self.members[k].state.model

        return evaluate_each(
            self.stacked, own_network, self.active(), self.data.x_test, self.data.y_test
        )

    def end_all(self, status: str) -> None:
        for k in self.active():
            member = self.members[k]
            try:
                with member.own_randomness():
                    for cb in member.run.callbacks:
                        fn = getattr(cb, "on_train_end", None)
                        if fn is not None:
                            fn(member.state, status)
            except Exception:  # the error on its way up is the one to report
                pass
