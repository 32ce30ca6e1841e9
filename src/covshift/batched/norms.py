"""The members' normalization layers as one layer, each member's statistics its own.

Every norm of the battery normalizes over groups of values that never cross a channel
(BatchNorm and its variants: one channel over the batch; GroupNorm: a group of channels
of one example; InstanceNorm: one channel of one example). Laying the ``K`` members'
channels side by side (``K*C`` channels, member ``k`` the block ``[k*C, (k+1)*C)``)
therefore turns ``K`` norm layers into one layer of the same kind:

- BatchNorm, Ghost BN, Batch Renorm, InstanceNorm over ``C`` channels -> the same class
  over ``K*C`` (running statistics per channel, so per member; Ghost BN's virtual
  batches split the batch axis, which every member shares; Batch Renorm's r and d are
  per channel and its schedule counts the steps every member takes together);
- GroupNorm(G, C) -> GroupNorm(K*G, K*C) (a group never spans two members);
- LayerNorm(F) of a fully connected layer -> each row normalized over its features,
  then the member's own per-feature affine;
- RMSNorm(F) -> the functional RMS normalization per member row, then the members'
  own weights;
- Santurkar et al.'s noisy BN (:class:`~covshift.nn.NoisyNorm`) -> the batched
  BatchNorm, then each member's noise drawn from that member's own random stream, in
  the order and shapes its one-at-a-time run draws it (:class:`BatchedNoise`).

Fully connected members carry rows ``(K, B, F)``. BatchNorm, LayerNorm and RMSNorm
normalize those rows where they are (:class:`RowsBatchNorm`: statistics over each
member's batch, dim 1; :class:`RowsLayerNorm`, :class:`RowsRMSNorm`: over each row's
features), then apply each member's affine; a member's numbers then do not depend on
how many members share the call. The other kinds see ``(B, K*F)`` (one copy in, a view
out, :class:`RowsNorm`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from covshift.batched.layers import channels_to_rows, rows_to_channels
from covshift.batched.slots import NotBatchable, Slot
from covshift.nn import NoisyNorm, TimeVaryingNoise, functional, norm_kind
from covshift.nn import running as running_stats

__all__ = [
    "BatchedNoise",
    "RowsBatchNorm",
    "RowsLayerNorm",
    "RowsNorm",
    "RowsRMSNorm",
    "stack_norm",
]

_CHANNEL_KINDS = ("batch", "ghost_batch", "batch_renorm", "instance")


class RowsNorm(nn.Module):
    """A norm over ``K*F`` channels applied to fully connected members' rows:
    ``(K, B, F)`` -> ``(B, K*F)`` -> the norm -> ``(K, B, F)`` (a view)."""

    def __init__(self, norm: nn.Module, members: int) -> None:
        super().__init__()
        self.norm = norm
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        return channels_to_rows(self.norm(rows_to_channels(x)), self.members)


class _RowsBatchNormFunction(torch.autograd.Function):
    """BatchNorm's training math on contiguous rows ``(K, B, F)``, statistics over dim 1
    (Ioffe & Szegedy 2015), in a few whole-tensor operations::

        mu, var = mean, biased variance over the B rows        (K, 1, F)
        rstd = 1 / sqrt(var + eps),  x_hat = (x - mu) * rstd
        y = x_hat * w + b
        dx = rstd * (g_w - mean_B(g_w) - x_hat * mean_B(g_w * x_hat)),  g_w = dy * w
        dw = sum_B(dy * x_hat),  db = sum_B(dy)

    (docs/derivations.md §2, the per-channel BatchNorm backward, with the batch axis 1).
    Each member is reduced over its own rows only, in the same order whatever K is.
    Returns ``y`` and the batch statistics (no gradient through them)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        # Two passes (the mean, then the mean square of the centred rows): faster here
        # than a one-pass var_mean over the middle dim, and how covshift.nn computes it.
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=1, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        x_hat = centred * rstd
        if weight is None:
            y = x_hat if bias is None else x_hat + bias
        else:
            y = x_hat * weight if bias is None else torch.addcmul(bias, x_hat, weight)
        ctx.mark_non_differentiable(mean, var)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x_hat, rstd, weight)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _mean: Tensor, _var: Tensor):
        x_hat, rstd, weight = ctx.saved_tensors
        dy = dy.contiguous()
        gw = dy if weight is None else dy * weight
        proj = (gw * x_hat).mean(dim=1, keepdim=True)
        dx = (gw - gw.mean(dim=1, keepdim=True) - x_hat * proj) * rstd
        dw = (dy * x_hat).sum(dim=1, keepdim=True) if ctx.needs_input_grad[1] else None
        db = dy.sum(dim=1, keepdim=True) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


class RowsBatchNorm(nn.Module):
    """``K`` BatchNorms (Ioffe & Szegedy 2015) on fully connected members' rows
    ``(K, B, F)``, holding their parameters and buffers in ``norm``, a BatchNorm over
    ``K*F`` channels.

    Training: ``x_hat = (x - mu_k) / sqrt(var_k + eps)`` with each member's batch mean
    and biased variance over its ``B`` rows (dim 1), then ``x_hat * w_k + b_k``
    (:class:`_RowsBatchNormFunction`); the running statistics move by BatchNorm's rule
    (``running = (1 - m) running + m batch``, the unbiased variance, ``momentum=None``
    the cumulative average), one step counted for all members. Eval (running
    statistics): ``norm`` itself on the ``(B, K*F)`` view, a per-channel affine map,
    so element by element the member's own eval.
    """

    def __init__(self, norm: nn.Module, members: int) -> None:
        super().__init__()
        self.norm = norm
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        tracked = norm.running_mean is not None
        if not self.training and tracked:
            return channels_to_rows(norm(rows_to_channels(x)), self.members)
        k, batch, features = x.shape
        if self.training and batch < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{[batch, features]} (per member)"
            )
        weight = None if norm.weight is None else norm.weight.view(k, 1, features)
        bias = None if norm.bias is None else norm.bias.view(k, 1, features)
        y, mean, var = _RowsBatchNormFunction.apply(x.contiguous(), weight, bias, norm.eps)
        if self.training and tracked:
            factor = running_stats.step_factor(norm.momentum, norm.num_batches_tracked, True)
            running_stats.update(
                norm.running_mean.view(k, features),
                norm.running_var.view(k, features),
                mean.view(k, features),
                var.view(k, features),
                factor,
                running_stats.bessel(batch),
            )
        return y


def _member_affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, k: int) -> Tensor:
    """``y * w_k + b_k`` on rows ``(K, B, F)``, ``weight``/``bias`` ``(K*F,)``."""
    if weight is None:
        return y if bias is None else y + bias.view(k, 1, -1)
    w = weight.view(k, 1, -1)
    return y * w if bias is None else torch.addcmul(bias.view(k, 1, -1), y, w)


class RowsLayerNorm(nn.Module):
    """``K`` LayerNorms over the features of fully connected members' rows
    (Ba et al. 2016): each row normalized by its own mean and variance, then member
    ``k``'s element-wise ``w_k``, ``b_k`` (``(K*F,)`` each)."""

    def __init__(self, members: int, features: int, eps: float, affine: bool, bias: bool) -> None:
        super().__init__()
        self.members = members
        self.features = features
        self.eps = eps
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if affine:
            self.weight = nn.Parameter(torch.empty(members * features))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.empty(members * features))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        y = functional.layer_norm(x.contiguous(), (self.features,), None, None, self.eps)
        return _member_affine(y, self.weight, self.bias, self.members)


class RowsRMSNorm(nn.Module):
    """``K`` RMSNorms over the last dim of ``(K, B, F)``: ``x / sqrt(mean(x^2) + eps)``
    per row (Zhang & Sennrich 2019), then member ``k``'s weight ``(F,)``."""

    def __init__(self, members: int, features: int, eps: float | None, affine: bool) -> None:
        super().__init__()
        self.members = members
        self.features = features
        self.eps = eps
        self.weight: nn.Parameter | None
        if affine:
            self.weight = nn.Parameter(torch.empty(members, features))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor) -> Tensor:
        y = functional.rms_norm(x.contiguous(), (self.features,), None, self.eps)
        return y if self.weight is None else y * self.weight.unsqueeze(1)


class BatchedNoise(nn.Module):
    """Each member's :class:`~covshift.nn.TimeVaryingNoise`, ``a <- s * a + m`` (Santurkar et
    al. 2018, Sec. 2.1), drawn from the member's own generator.

    A member's draws are those of its one-at-a-time run: the same calls (the step's
    two scalars, then ``m`` and ``s`` of the member's activation shape) on a generator
    in the same state as that run's global generator (the trainer sets
    :meth:`use_generators` to the members' streams). No noise in eval mode.
    """

    def __init__(self, noises: Sequence[TimeVaryingNoise], rows: bool) -> None:
        super().__init__()
        self.noises = [copy.deepcopy(n) for n in noises]  # plain list: no parameters
        self.rows = rows

    @property
    def members(self) -> int:
        return len(self.noises)

    def use_generators(self, generators: Sequence[torch.Generator]) -> None:
        for noise, generator in zip(self.noises, generators, strict=True):
            noise.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        k = self.members
        # The member's own activation shape: (B, F) of the rows, (B, C, *) of a block.
        shape = x.shape[1:] if self.rows else (x.shape[0], x.shape[1] // k, *x.shape[2:])
        draws = [n.sample(torch.Size(shape), x.device, x.dtype) for n in self.noises]
        if self.rows:
            s = torch.stack([d[0] for d in draws])
            m = torch.stack([d[1] for d in draws])
        else:
            s = torch.cat([d[0] for d in draws], dim=1)
            m = torch.cat([d[1] for d in draws], dim=1)
        return torch.addcmul(m, s, x)  # s * a + m, s and m constants for autograd


class _NoisyStack(nn.Module):
    """The batched norm, then :class:`BatchedNoise` (the member's ``NoisyNorm``)."""

    def __init__(self, norm: nn.Module, noise: BatchedNoise) -> None:
        super().__init__()
        self.norm = norm
        self.noise = noise

    def forward(self, x: Tensor) -> Tensor:
        return self.noise(self.norm(x))


def _same_settings(singles: Sequence[nn.Module]) -> None:
    first = singles[0]
    for other in singles[1:]:
        if type(other) is not type(first) or other.extra_repr() != first.extra_repr():
            raise NotBatchable(
                f"the members' norm layers differ ({first.extra_repr()!r} vs "
                f"{other.extra_repr()!r}): only layers of one kind and setting stack"
            )


def _channel_slots(module: nn.Module, prefix: str = "") -> list[Slot]:
    out = []
    for name in ("weight", "bias"):
        if getattr(module, name, None) is not None:
            out.append(Slot(prefix + name, module, name))
    for name in ("running_mean", "running_var"):
        if getattr(module, name, None) is not None:
            out.append(Slot(prefix + name, module, name))
    if getattr(module, "num_batches_tracked", None) is not None:
        out.append(Slot(prefix + "num_batches_tracked", module, "num_batches_tracked", True))
    return out


def _widen(module: nn.Module, members: int) -> None:
    """Give ``module`` (a copy of one member's layer) ``members`` times its channels:
    fresh parameters and buffers of the batched size (their values are set later)."""
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if p is not None:
            setattr(module, name, nn.Parameter(p.detach().new_empty(members * p.numel())))
    for name in ("running_mean", "running_var"):
        b = getattr(module, name, None)
        if b is not None:
            setattr(module, name, b.new_empty(members * b.numel()))


def stack_norm(singles: Sequence[nn.Module], rows: bool) -> tuple[nn.Module, list[Slot]]:
    """The batched layer of the members' norm layers ``singles`` and its slots.

    ``rows``: the members' values come as rows ``(K, B, F)`` (fully connected), else
    as channel blocks ``(B, K*C, *)``. Raises :class:`NotBatchable` for a kind this
    module does not stack (SyncBatchNorm, custom layers) or members whose layers differ.
    """
    members = len(singles)
    first = singles[0]
    _same_settings(singles)
    if isinstance(first, NoisyNorm):
        inner, slots = stack_norm([s.norm for s in singles], rows)
        noise = BatchedNoise([s.noise for s in singles], rows)
        return _NoisyStack(inner, noise), [s.renamed("norm.") for s in slots]
    kind = norm_kind(first)
    if kind in _CHANNEL_KINDS or kind == "group":
        layer = copy.deepcopy(first)
        if kind == "group":
            layer.num_groups *= members
            layer.num_channels *= members
        else:
            layer.num_features *= members
        _widen(layer, members)
        slots = _channel_slots(layer)
        if not rows:
            return layer, slots
        if kind == "batch":
            return RowsBatchNorm(layer, members), slots
        return RowsNorm(layer, members), slots
    if kind == "layer" and rows and len(first.normalized_shape) == 1:
        features = first.normalized_shape[0]
        layer = RowsLayerNorm(
            members,
            features,
            first.eps,
            first.weight is not None,
            getattr(first, "bias", None) is not None,
        )
        return layer, _channel_slots(layer)
    if kind == "rms" and rows and len(first.normalized_shape) == 1:
        features = first.normalized_shape[0]
        layer = RowsRMSNorm(members, features, first.eps, first.weight is not None)
        return layer, ([Slot("weight", layer, "weight")] if layer.weight is not None else [])
    raise NotBatchable(
        f"{type(first).__name__} ({kind or 'not a known norm'}) has no batched form "
        f"for {'fully connected' if rows else 'convolutional'} members"
    )
