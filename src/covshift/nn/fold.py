"""BatchNorm at inference: fold it into the layer before it, or freeze it.

**Folding.** In eval mode BatchNorm is the per-channel affine map
``y = (z - mu) * s + beta`` with ``s = gamma / sqrt(running_var + eps)``; after
``z = W x + b`` (Linear or Conv) the two compose into one layer::

    W' = s[o] * W[o]            b' = (b - mu) * s + beta        (per output channel o)

:func:`fold_batchnorm` rewrites the Linear/Conv in place of the pair and puts
``nn.Identity()`` where the BatchNorm was (so the other state_dict keys keep their
names). Patterns recognized, the BatchNorm directly consuming the layer's output:

1. consecutive children ``(layer, bn)`` of an ``nn.Sequential`` (the Sequential's
   order *is* its forward);
2. with ``by_name=True``, sibling children named ``<conv|fc|linear><suffix>`` and
   ``<bn|norm><suffix>`` (``conv1``/``bn1``, ``conv``/``bn``, ``fc``/``bn``,
   ``conv``/``norm``: torchvision's ResNet blocks, timm's ConvNormAct). This
   *assumes* the module's forward applies the norm directly to the layer's output;
   pass ``check_input`` to verify it on an example.

``layer`` is a ``Linear`` or ``Conv1d/2d/3d`` (subclasses that keep the base
``forward`` too; not weight-standardized or transposed convs, whose weight does not
enter linearly per output channel); ``bn`` any BatchNorm kind with running statistics
(torch's, covshift's, SyncBatchNorm, Batch Renorm and Ghost BN, which are all
BatchNorm in eval) whose ``num_features`` equals the layer's output channels. A
Linear is assumed to feed the BatchNorm ``(N, C)`` inputs (features in dim 1).
The arithmetic runs in float64 and is cast back to the layer's dtype.

**Freezing.** ``requires_grad=False`` on a BatchNorm stops its affine from learning
but *not* its running statistics, which keep moving in train mode; and
``model.train()`` undoes a ``bn.eval()``. :func:`freeze_batchnorm` does both and
makes it stick: a forward pre-hook puts frozen layers back in eval mode at every
call. :func:`unfreeze_batchnorm` reverses it.
"""

from __future__ import annotations

import copy
import itertools
import re

import torch
from torch import Tensor, nn

from covshift.nn.convert import ConversionEntry, ConversionReport, norm_kind

__all__ = [
    "fold_batchnorm",
    "fold_batchnorm_with_report",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
]

_BATCH_KINDS = {"batch", "sync_batch", "batch_renorm", "ghost_batch"}
_LINEAR_FORWARDS = {
    nn.Linear.forward: nn.Linear,
    nn.Conv1d.forward: nn.Conv1d,
    nn.Conv2d.forward: nn.Conv2d,
    nn.Conv3d.forward: nn.Conv3d,
}
_LAYER_NAME = re.compile(r"(conv|fc|linear)(.*)")
_NORM_PREFIXES = ("bn", "norm")


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _is_foldable_layer(m: nn.Module) -> bool:
    base = _LINEAR_FORWARDS.get(type(m).forward)
    return base is not None and isinstance(m, base)


def _why_not(layer: nn.Module, bn: nn.Module) -> str | None:
    """None when ``bn`` folds into ``layer``, else the reason it does not."""
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): eval uses batch statistics"
    if not _is_foldable_layer(layer):
        return f"preceded by {type(layer).__name__}, not a Linear/Conv1d/2d/3d"
    if _out_channels(layer) != bn.num_features:
        return (
            f"{type(layer).__name__} has {_out_channels(layer)} output channels, "
            f"the norm {bn.num_features}"
        )
    return None


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    w = layer.weight
    f64 = {"dtype": torch.float64}
    scale = torch.rsqrt(bn.running_var.to(**f64) + bn.eps)  # (C,)
    if bn.weight is not None:
        scale = scale * bn.weight.to(**f64)
    shift = -bn.running_mean.to(**f64) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(**f64)
    if layer.bias is not None:
        shift = shift + layer.bias.to(**f64) * scale
    w.copy_((w.to(**f64) * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.to(w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(shift.to(layer.bias.dtype))


def _pairs(parent: nn.Module, by_name: bool) -> list[tuple[str, str]]:
    """(layer child name, norm child name) pairs of ``parent`` by the patterns."""
    names = [name for name, _ in parent.named_children()]
    if isinstance(parent, nn.Sequential):
        return list(itertools.pairwise(names))
    if not by_name:
        return []
    pairs = []
    for name in names:
        match = _LAYER_NAME.fullmatch(name)
        if match:
            suffix = match.group(2)
            pairs += [(name, p + suffix) for p in _NORM_PREFIXES if p + suffix in names]
    return pairs


def fold_batchnorm_with_report(
    model: nn.Module,
    *,
    inplace: bool = False,
    by_name: bool = True,
    check_input: Tensor | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> tuple[nn.Module, ConversionReport]:
    """:func:`fold_batchnorm`, also returning a report: one entry per BatchNorm-kind
    layer, folded (target ``Identity``, ``carried`` naming the layer it went into) or
    not (no target, a note saying why)."""
    if not inplace:
        model = copy.deepcopy(model)
    reference = None
    if check_input is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            reference = model(check_input)
        model.train(was_training)
    report = ConversionReport()
    folded_layers: set[int] = set()
    folded_norms: set[int] = set()
    reasons: dict[int, str] = {}  # why a norm was not folded, by id
    for parent_path, parent in list(model.named_modules()):
        children = dict(parent.named_children())
        for layer_name, norm_name in _pairs(parent, by_name):
            layer, bn = children[layer_name], children[norm_name]
            if norm_kind(bn) not in _BATCH_KINDS or id(bn) in folded_norms:
                continue
            prefix = f"{parent_path}." if parent_path else ""
            reason = _why_not(layer, bn)
            if reason is None and id(layer) in folded_layers:
                reason = f"{prefix}{layer_name} already absorbed another norm"
            if reason is not None:
                reasons.setdefault(id(bn), reason)
                continue
            _fold_into(layer, bn)
            setattr(parent, norm_name, nn.Identity())
            folded_layers.add(id(layer))
            folded_norms.add(id(bn))
            into = f"folded into {prefix}{layer_name} ({type(layer).__name__})"
            entry = ConversionEntry(prefix + norm_name, type(bn).__name__, "Identity", [into])
            report.entries.append(entry)
    for path, m in model.named_modules():  # what is left unfolded
        if norm_kind(m) in _BATCH_KINDS:
            why = reasons.get(id(m), "not paired with a preceding Linear/Conv by any pattern")
            report.entries.append(ConversionEntry(path, type(m).__name__, "", notes=[why]))
    if reference is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(check_input)
        model.train(was_training)
        if not torch.allclose(out, reference, rtol=rtol, atol=atol):
            err = (out - reference).abs().max().item()
            raise ValueError(
                f"folding changed the eval output on check_input (max abs diff {err:.3g}); "
                "a name-paired norm is probably not applied directly to its layer's "
                "output: retry with by_name=False\n" + str(report)
            )
    return model, report


def fold_batchnorm(
    model: nn.Module,
    *,
    inplace: bool = False,
    by_name: bool = True,
    check_input: Tensor | None = None,
) -> nn.Module:
    """Fold every BatchNorm that directly follows a Linear/Conv into it, for inference.

    The folded model computes the original's *eval-mode* output (running
    statistics) within float tolerance, with one layer instead of two. See the
    module docstring for the patterns recognized; BatchNorms elsewhere stay as they
    are (:func:`fold_batchnorm_with_report` lists them and why).

    Args:
        model: any module.
        inplace: change ``model`` itself; by default a deep copy is folded.
        by_name: also fold name-paired siblings (``conv1``/``bn1``, ...), which
            assumes the forward applies the norm right after the layer.
        check_input: an example input; the eval outputs before and after folding
            are compared and ValueError is raised when they differ.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> fused = fold_batchnorm(net)
        >>> type(fused[1]).__name__
        'Identity'
    """
    folded, _ = fold_batchnorm_with_report(
        model, inplace=inplace, by_name=by_name, check_input=check_input
    )
    return folded


def _stay_in_eval(module: nn.Module, args: object) -> None:
    if getattr(module, "_covshift_frozen", False) and module.training:
        module.train(False)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Freeze every BatchNorm-kind layer: running statistics *and* affine, for good.

    Each layer goes to eval mode (its running statistics normalize and stop
    updating), its parameters get ``requires_grad=False``, and a forward pre-hook
    returns it to eval mode whenever ``model.train()`` switched it back. Returns
    ``model`` (changed in place).

    Example:
        >>> net = freeze_batchnorm(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)))
        >>> _ = net.train()(torch.randn(16, 4))  # the BN's running stats do not move
    """
    for m in model.modules():
        if norm_kind(m) not in _BATCH_KINDS:
            continue
        m.train(False)
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
        if not getattr(m, "_covshift_freeze_hooked", False):
            m.register_forward_pre_hook(_stay_in_eval)
            m._covshift_freeze_hooked = True
        m._covshift_frozen = True
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_batchnorm`: parameters trainable again, mode that of ``model``."""
    for m in model.modules():
        if getattr(m, "_covshift_frozen", False):
            m._covshift_frozen = False
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
            m.train(model.training)
    return model
