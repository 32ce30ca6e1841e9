"""SyncBatchNorm on any torch.distributed backend (gloo on CPU included), and back
(torch's runs only on GPUs, one way). One ``all_reduce`` in forward (``[Σx, Σx², n]``
per channel: unequal batch sizes are exact) and one in backward (``[Σdy, Σdy·x̂]``);
parameter gradients are the local sums, as torch's (DDP reduces them). Moments two-pass
per rank, sums in float64, so ``Σx²/N − μ²`` stays within float32 rounding for |μ|/σ up
to about 1e4. Derivation, double backward included: docs/derivations.md §12.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from covshift.nn import checks, registry
from covshift.nn import functional as CF
from covshift.nn import running as running_stats
from covshift.nn._base import BatchNormForward
from covshift.nn.convert_carry import replace_modules

__all__ = ["SyncBatchNorm", "sync_batch_norm"]

ProcessGroup = Any  # torch.distributed.ProcessGroup: Any keeps builds without it importable


def _world_size(group: ProcessGroup | None) -> int:
    """Processes in ``group``, 1 when torch.distributed is absent or not initialized."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Differentiable ``all_reduce(SUM)``, whose adjoint is itself (§12): backward calls
    ``apply`` again, so higher derivatives work too."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.group = group
        out = x.clone()
        if _world_size(group) > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))  # (C,) -> (1, C, 1, ...)


def _global_moments(x: Tensor, group: ProcessGroup | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(C,)`` mean and biased variance over every rank's batch (in the compute dtype),
    and the count N (0-dim), differentiable in ``x`` (the double backward uses that)."""
    c = x.shape[1]
    n = x.numel() // c if c else 0  # values per channel on this rank
    # The reduced sums in float64, except where the device has none (Apple MPS).
    sum_dtype = torch.float32 if x.device.type == "mps" else torch.float64
    if n > 0:
        mean, var = CF.moments(x, [0, *range(2, x.dim())])  # (C,) local, two-pass
        mean = mean.to(sum_dtype)
        s1 = mean * n  # (12.1)
        s2 = (var.to(sum_dtype) + mean * mean) * n  # (12.1)
    else:  # an empty shard still joins the collective
        s1 = s2 = x.new_zeros(c, dtype=sum_dtype)
    count = torch.full((1,), float(n), dtype=sum_dtype, device=x.device)
    total = _AllReduceSum.apply(torch.cat([s1, s2, count]), group)  # (2C + 1,)
    s1, s2, big_n = total[:c], total[c : 2 * c], total[2 * c]
    mean = s1 / big_n  # (12.2)
    var = (s2 / big_n - mean * mean).clamp_min(0)  # (12.2); rounding can dip below 0
    stat = CF.compute_dtype(x.dtype)
    return mean.to(stat), var.to(stat), big_n


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalize with the given global statistics; the backward reduces ``[Σdy, Σdy·x̂]``
    and accounts for the statistics' dependence on ``x`` in closed form, (12.3). Saves
    ``x``, ``weight``, ``mean``, ``invstd``; under ``create_graph`` the statistics are
    recomputed differentiably, so double backward is exact."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        big_n: Tensor,
        eps: float,
        group: ProcessGroup | None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, mean, invstd, big_n)
        ctx.eps, ctx.group = eps, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        scale = invstd if weight is None else weight.to(invstd.dtype) * invstd  # (C,)
        shift = -mean * scale if bias is None else bias.to(invstd.dtype) - mean * scale
        y = x.to(invstd.dtype) * _channel_view(scale, x) + _channel_view(shift, x)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd, big_n = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph: the saved statistics are constants; recompute them as
            # functions of x so that d(dx)/dx includes their dependence on x.
            mean, var, big_n = _global_moments(x, ctx.group)
            invstd = torch.rsqrt(var + ctx.eps)
        dims, stat, c = [0, *range(2, x.dim())], mean.dtype, x.shape[1]
        xhat = (x.to(stat) - _channel_view(mean, x)) * _channel_view(invstd, x)  # (N, C, *)
        dy_s = dy.to(stat)
        sum_dy, sum_dy_xhat = dy_s.sum(dims), (dy_s * xhat).sum(dims)  # (C,) local
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            both = _AllReduceSum.apply(torch.cat([sum_dy, sum_dy_xhat]), ctx.group)  # global
            means = both / big_n.to(stat)  # [Σdy / N, Σdy·x̂ / N]
            scale = invstd if weight is None else weight.to(stat) * invstd  # (C,)
            dx = dy_s - _channel_view(means[:c], x) - xhat * _channel_view(means[c:], x)
            dx = (_channel_view(scale, x) * dx).to(x.dtype)  # (12.3)
        # (12.4), the local sums: DDP reduces parameter gradients itself.
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = sum_dy.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None, None


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """Batch normalization of ``input`` ``(N, C, *)`` (N may differ between ranks) with
    the statistics of every rank in ``process_group`` (None: the world); the running
    buffers, when given, move by factor ``momentum`` with the global count (§7).

    ValueError for fewer than two values per channel over the whole group.
    """
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    c = input.shape[1]
    with torch.no_grad():
        mean, var, big_n = _global_moments(input.detach(), process_group)
    if input.numel() // max(c, 1) <= 1:
        # Only checked on the host when this rank alone cannot rule it out: the
        # global count lives on the device and reading it costs a sync.
        where = " (summed over the process group)"
        checks.values_per_channel(input.shape, int(big_n.item()), empty_ok=False, where=where)
    if running_mean is not None and running_var is not None:
        bessel = running_stats.bessel(big_n)  # the global count, on the device
        running_stats.update(running_mean, running_var, mean, var, momentum, bessel)
    invstd = torch.rsqrt(var + eps)
    return _SyncBatchNormFunction.apply(
        input, weight, bias, mean, invstd, big_n, eps, process_group
    )


class SyncBatchNorm(BatchNormForward, nn.SyncBatchNorm):
    """Batch normalization (Ioffe & Szegedy 2015, arXiv 1502.03167) whose statistics span
    a torch.distributed group: ``y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta``,
    ``E``, ``Var`` (biased) per channel over every rank's batch. ``torch.nn.SyncBatchNorm``
    with covshift's forward (any backend, see the module docstring); alone or in eval
    mode, local BatchNorm.

    Example:
        >>> bn = SyncBatchNorm(16)  # shares statistics once dist.init_process_group ran
        >>> bn(torch.randn(4, 16, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
    """

    # The class this layer replaced (set by convert_sync_batchnorm and the registry),
    # so that revert_sync_batchnorm can restore it.
    original_class: type[nn.Module] | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels in dim 1 "
                f"(num_features), got shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        # As torch's SyncBatchNorm: synchronize only in training. Eval may run on one
        # rank alone (validation on rank 0) and must not wait for the others.
        if not (self.training and _world_size(self.process_group) > 1):
            return super().forward(input)  # alone: exactly BatchNorm
        self._check_input_dim(input)
        tracking = self.track_running_stats
        counter = self.num_batches_tracked if tracking else None
        factor = running_stats.step_factor(self.momentum, counter, tracking)
        running = (self.running_mean, self.running_var) if tracking else (None, None)
        affine = (self.weight, self.bias)
        return sync_batch_norm(input, *running, *affine, factor, self.eps, self.process_group)

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group: ProcessGroup | None = None
    ) -> nn.Module:
        """torch's classmethod for this class (BatchNorm1d/2d/3d and torch's SyncBatchNorm
        replaced, sharing parameters and buffers), except that a subclass with its own
        forward or children stays (with a warning) and each layer records the class it
        replaced for :meth:`revert_sync_batchnorm` (docs/nn.md).

        Example:
            >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
            >>> type(SyncBatchNorm.convert_sync_batchnorm(net)[1]).__name__
            'SyncBatchNorm'
        """

        def build(m: nn.Module) -> nn.Module | None:
            if isinstance(m, cls):
                return None
            own = registry.own_behaviour(m)
            if own is not None:
                warnings.warn(
                    f"{own}; left unconverted (converting it would drop its extra behaviour)",
                    stacklevel=5,
                )
                return None
            new = cls(*_batch_norm_args(m), process_group, bias=m.bias is not None)
            new.original_class = getattr(m, "original_class", None) or type(m)
            return new

        return _swap_sharing_state(module, ("batch", "sync_batch"), build)

    @staticmethod
    def revert_sync_batchnorm(module: nn.Module, to: type[nn.Module] | None = None) -> nn.Module:
        """Replace every SyncBatchNorm by the class it recorded (else ``to``), sharing
        parameters and buffers; return ``module`` or its replacement.

        Raises:
            ValueError: no recorded class and no ``to`` (only the caller knows the rank).
        """

        def build(m: nn.Module) -> nn.Module:
            target = getattr(m, "original_class", None) or to
            if target is None:
                raise ValueError(
                    f"{type(m).__name__}({m.num_features}) has no record of the class it "
                    "replaced; pass to=nn.BatchNorm1d/2d/3d (or covshift's) to revert it"
                )
            return target(*_batch_norm_args(m), bias=m.bias is not None)

        return _swap_sharing_state(module, ("sync_batch",), build)


def _batch_norm_args(m: nn.Module) -> tuple:
    return m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats


def _swap_sharing_state(
    module: nn.Module, kinds: tuple[str, ...], build: Callable[[nn.Module], nn.Module | None]
) -> nn.Module:
    """Replace each layer of ``kinds`` in ``module`` by ``build(layer)`` (None: keep it),
    which takes the layer's parameter and buffer objects and its mode."""

    def swap(m: nn.Module, _path: str) -> nn.Module | None:
        new = build(m) if registry.norm_kind(m) in kinds else None
        if new is None:
            return None
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if getattr(m, name, None) is not None and getattr(new, name, None) is not None:
                setattr(new, name, getattr(m, name))
        return new.train(m.training)

    return replace_modules(module, swap)


def _create(num_features: int, *, dims: int, **kw: object) -> SyncBatchNorm:
    layer = SyncBatchNorm(num_features, **kw)  # type: ignore[arg-type]
    layer.original_class = registry.get_kind("batch").cls(dims)  # what revert restores
    return layer


registry.register_kind(
    registry.NormKind(
        "sync_batch", {None: SyncBatchNorm}, {None: nn.SyncBatchNorm}, batch_statistics=True
    ),
    _create,
)
