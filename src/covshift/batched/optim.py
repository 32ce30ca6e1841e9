"""One SGD for ``K`` members, each with its own learning rate, momentum, weight decay,
frozen parameters and state: exactly ``K`` runs of torch's SGD.

For each parameter the members are cut into *runs* of neighbours that share their
settings and train it (a member that froze the parameter, or dropped out after
diverging, is in no run); each run's block of the batched parameter is stepped with
torch's own rule (``torch.optim.SGD``, dampening 0, no Nesterov)::

    g   <- g + wd * p                          (weight decay)
    buf <- g  (first step),  momentum * buf + g  (after)       (momentum != 0)
    p   <- p - lr * buf      (or lr * g without momentum)

with the same tensor operations as torch's single-tensor SGD, element by element, so a
member steps exactly as its one-at-a-time run's optimizer would on the same gradient.
The batch of a sweep is sorted by these settings, so a learning-rate sweep has one run
per rate, and a grid of seeds one run in all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["MemberSGD", "SGDSettings"]


@dataclass(frozen=True)
class SGDSettings:
    """One member's SGD: learning rate, momentum, weight decay."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class _Run:
    start: int
    stop: int
    settings: SGDSettings


class MemberSGD:
    """SGD over batched parameters (member ``k`` = block ``k`` of ``p.view(K, -1)``).

    Args:
        params: the batched parameters.
        settings: each member's :class:`SGDSettings`.
        trainable: per parameter, which members train it (False: frozen there).
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        settings: Sequence[SGDSettings],
        trainable: Sequence[Sequence[bool]],
    ) -> None:
        self.params = list(params)
        self.settings = list(settings)
        self.members = len(self.settings)
        self.trainable = [list(t) for t in trainable]
        self.active = [True] * self.members
        # Per parameter: the momentum buffers (batched), and which members have one.
        self.buffers: list[Tensor | None] = [None] * len(self.params)
        self.started = [[False] * self.members for _ in self.params]
        self._runs = self._cut_runs()

    def drop(self, k: int) -> None:
        """Member ``k`` steps no more (it diverged or failed)."""
        self.active[k] = False
        self._runs = self._cut_runs()

    def _cut_runs(self) -> list[list[_Run]]:
        runs_per_param: list[list[_Run]] = []
        for mask in self.trainable:
            runs: list[_Run] = []
            for k in range(self.members):
                if not (self.active[k] and mask[k]):
                    continue
                last = runs[-1] if runs else None
                if last is not None and last.stop == k and last.settings == self.settings[k]:
                    runs[-1] = _Run(last.start, k + 1, last.settings)
                else:
                    runs.append(_Run(k, k + 1, self.settings[k]))
            runs_per_param.append(runs)
        return runs_per_param

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def member_blocks(self, tensor: Tensor) -> Tensor:
        return tensor.view(self.members, -1)

    @torch.no_grad()
    def step(self, lr_at: Callable[[float], float] | None = None) -> None:
        """One SGD step of every active member.

        ``lr_at`` maps a member's learning rate to this step's (its run's warm-up or
        decay: :meth:`covshift.training.TrainConfig.lr_at`), the rate torch's SGD is
        given at that step in the member's one-at-a-time run; None: the rate as set.
        """
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            params = self.member_blocks(p)
            grads = p.grad.reshape(self.members, -1)
            for run in self._runs[i]:
                lr = run.settings.lr if lr_at is None else lr_at(run.settings.lr)
                self._step_run(
                    i, params[run.start : run.stop], grads[run.start : run.stop], run, lr
                )

    def _step_run(self, i: int, param: Tensor, grad: Tensor, run: _Run, lr: float) -> None:
        s = run.settings
        if s.weight_decay != 0:
            grad = grad.add(param, alpha=s.weight_decay)
        if s.momentum != 0:
            if self.buffers[i] is None:
                self.buffers[i] = torch.zeros_like(self.params[i]).view(self.members, -1)
            buf = self.buffers[i][run.start : run.stop]  # type: ignore[index]
            started = self.started[i][run.start : run.stop]
            if all(started):
                buf.mul_(s.momentum).add_(grad, alpha=1)
            elif not any(started):
                buf.copy_(grad)
                for k in range(run.start, run.stop):
                    self.started[i][k] = True
            else:  # members of one run at different points: each on its own
                for j, k in enumerate(range(run.start, run.stop)):
                    if self.started[i][k]:
                        buf[j].mul_(s.momentum).add_(grad[j], alpha=1)
                    else:
                        buf[j].copy_(grad[j])
                        self.started[i][k] = True
            grad = buf
        param.add_(grad, alpha=-lr)

    def member_buffer(self, i: int, k: int) -> Tensor | None:
        """Member ``k``'s momentum buffer of parameter ``i`` (a flat view), or None
        when it has none (no momentum, or no step yet)."""
        buf = self.buffers[i]
        if buf is None or not self.started[i][k]:
            return None
        return buf[k]

    def set_member_buffer(self, i: int, k: int, value: Tensor | None) -> None:
        """Give member ``k`` the momentum buffer ``value`` (None: none yet)."""
        if value is None:
            self.started[i][k] = False
            return
        if self.buffers[i] is None:
            self.buffers[i] = torch.zeros_like(self.params[i]).view(self.members, -1)
        self.buffers[i][k].copy_(value.reshape(-1))  # type: ignore[index]
        self.started[i][k] = True
