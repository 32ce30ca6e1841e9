"""BatchNorm at inference: fold it into the Linear/Conv before it, or freeze it.

A BatchNorm in eval is a per-channel affine map that composes with the ``W x + b``
before it (torch's ``fuse_conv_bn_weights``, in float64); ``nn.Identity()`` takes its
place (a subclass with its own forward stays, with identity statistics). Pairs come from
:mod:`.fold_pairs`, each fold is checked and undone if an output changed. docs/nn.md
compares folding and freezing with torch's and timm's.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from covshift.nn import registry
from covshift.nn.convert import ConversionEntry, ConversionReport
from covshift.nn.fold_pairs import LAYER_TYPES, Pair, _eval_output, find_pairs

__all__ = [
    "fold_batchnorm",
    "fold_batchnorm_with_report",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
]


def _is_batch_norm(m: nn.Module) -> bool:
    return registry.norm_kind(m) in registry.batch_kinds()


def _why_not(layer: nn.Module, bn: nn.Module) -> str | None:
    """None when ``bn`` folds into ``layer``, else the reason it does not."""
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): eval uses batch statistics"
    # A Linear/Conv or a subclass that keeps its forward (WSConv2d changes its weight).
    base = next((c for c in LAYER_TYPES if type(layer).forward is c.forward), None)
    if base is None or not isinstance(layer, base):
        return f"preceded by {type(layer).__name__}, not a Linear/Conv1d/2d/3d"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != bn.num_features:
        return f"{type(layer).__name__} has {channels} output channels, the norm {bn.num_features}"
    return None


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """torch's ``fuse_conv_bn_weights`` (a Linear's weight too) in float64, written into
    the layer's own parameters (an optimizer built before keeps working)."""

    def f64(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(torch.float64)

    state = (bn.running_mean, bn.running_var)
    w, b = fuse_conv_bn_weights(
        f64(layer.weight), f64(layer.bias), *map(f64, state), bn.eps, f64(bn.weight), f64(bn.bias)
    )
    layer.weight.copy_(w)
    if layer.bias is None:
        grad = layer.weight.requires_grad
        layer.bias = nn.Parameter(b.detach().to(layer.weight.dtype), requires_grad=grad)
    else:
        layer.bias.copy_(b)


@torch.no_grad()
def _make_identity(bn: nn.Module) -> None:
    """Statistics and affine for which ``bn``'s eval map is ``y = x`` (to float rounding)."""
    tensors = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
    for t, value in zip(tensors, (0.0, 1.0 - bn.eps, 1.0, 0.0), strict=True):
        if t is not None:
            t.fill_(value)


def _local_input(layer: nn.Module) -> Tensor:
    """A random input of the smallest size ``layer`` accepts (any padding works)."""
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (4, layer.in_features)
    else:
        spatial = tuple(
            d * (k - 1) + 1 + 2 * s
            for k, d, s in zip(layer.kernel_size, layer.dilation, layer.stride, strict=True)
        )
        shape = (2, layer.in_channels, *spatial)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x.to(device=layer.weight.device, dtype=layer.weight.dtype)


def _differs(out: object, reference: object, rtol: float, atol: float) -> float | None:
    """The largest absolute difference when ``out`` and ``reference`` (tensors, or
    tuples/lists/dicts of them) are not close, else None."""
    if isinstance(reference, Tensor):
        if not isinstance(out, Tensor) or out.shape != reference.shape:
            return float("inf")
        scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
        if torch.allclose(out, reference, rtol=rtol, atol=atol * scale, equal_nan=True):
            return None
        return float((out - reference).abs().max())
    if isinstance(reference, dict) and isinstance(out, dict):
        pairs = [(out.get(k), v) for k, v in reference.items()]
    elif isinstance(reference, (tuple, list)) and isinstance(out, (tuple, list)):
        pairs = list(zip(out, reference, strict=False))
    else:
        return None if out == reference else float("inf")
    worst = [d for o, r in pairs if (d := _differs(o, r, rtol, atol)) is not None]
    return max(worst) if worst else None


def fold_batchnorm_with_report(
    model: nn.Module,
    *,
    inplace: bool = False,
    by_name: bool = False,
    check_input: Tensor | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> tuple[nn.Module, ConversionReport]:
    """:func:`fold_batchnorm`, and a report: one entry per BatchNorm-kind layer, folded
    (``carried`` names the layer it went into) or not (no target, a note says why)."""
    if not inplace:
        model = copy.deepcopy(model)
    reference = None if check_input is None else _eval_output(model, check_input)
    pairing = find_pairs(model, _is_batch_norm, check_input=check_input, by_name=by_name)
    report = ConversionReport()
    folded_layers, folded_norms = set(), set()  # ids
    reasons = dict(pairing.reasons)  # why a norm was not folded, by path
    for pair in pairing.pairs:
        layer, bn = model.get_submodule(pair.layer), model.get_submodule(pair.norm)
        if id(bn) in folded_norms:
            continue
        reason = _why_not(layer, bn)
        if reason is None and id(layer) in folded_layers:
            reason = f"{pair.layer} already absorbed another norm"
        if reason is None:
            reason = _fold_checked(model, pair, layer, bn, check_input, reference, rtol, atol)
        if reason is not None:
            reasons.setdefault(pair.norm, reason)
            continue
        folded_layers.add(id(layer))
        folded_norms.add(id(bn))
        entry = ConversionEntry(pair.norm, type(bn).__name__, "")
        entry.carried.append(f"folded into {pair.layer} ({type(layer).__name__})")
        if pair.source in ("name", "sequential"):
            entry.notes.append(f"paired by {pair.source}: {pairing.method}")
        kept = model.get_submodule(pair.norm)
        entry.target = type(kept).__name__
        if kept is bn:
            entry.notes.append(
                f"kept as an identity normalization: {type(bn).__name__} has its own "
                "forward or child modules (e.g. a fused activation), which still run"
            )
        report.entries.append(entry)
    for path, m in model.named_modules():  # what is left unfolded
        if _is_batch_norm(m) and id(m) not in folded_norms:
            why = reasons.get(path, f"not applied to a Linear/Conv output ({pairing.method})")
            report.entries.append(ConversionEntry(path, type(m).__name__, "", notes=[why]))
    return model, report


def _fold_checked(
    model: nn.Module,
    pair: Pair,
    layer: nn.Module,
    bn: nn.Module,
    check_input: Tensor | None,
    reference: object,
    rtol: float,
    atol: float,
) -> str | None:
    """Fold ``pair``; undo it and say why if the pair's output on a random input, or the
    model's on ``check_input``, changed."""
    had_bias = layer.bias is not None
    backup = [{k: v.clone() for k, v in m.state_dict().items()} for m in (layer, bn)]
    x = _local_input(layer)
    try:
        local = _eval_output(bn, _eval_output(layer, x))
    except Exception as e:  # a layer that needs more than its channels to run
        return f"the pair could not be run on a test input ({type(e).__name__}: {e})"
    _fold_into(layer, bn)
    parent_path, _, child = pair.norm.rpartition(".")
    parent = model.get_submodule(parent_path)
    plain = registry.own_behaviour(bn) is None
    if plain:
        setattr(parent, child, nn.Identity())
    else:
        _make_identity(bn)
    after = _eval_output(layer, x)
    worst = _differs(after if plain else _eval_output(bn, after), local, rtol, atol)
    why = None
    if worst is not None:
        why = (
            f"{type(bn).__name__}'s eval output is not its running-statistics affine map "
            f"(folding changed the pair's output by {worst:.3g}); left as it was"
        )
    elif check_input is not None:
        worst = _differs(_eval_output(model, check_input), reference, rtol, atol)
        if worst is not None:
            why = (
                f"folding into {pair.layer} changed the model's output on check_input by "
                f"{worst:.3g} (the output of {pair.layer} is used elsewhere too); left as it was"
            )
    if why is not None:
        if plain:
            setattr(parent, child, bn)
        if not had_bias:
            layer.bias = None
        layer.load_state_dict(backup[0])
        bn.load_state_dict(backup[1])
    return why


def fold_batchnorm(
    model: nn.Module,
    *,
    inplace: bool = False,
    by_name: bool = False,
    check_input: Tensor | None = None,
) -> nn.Module:
    """Fold every BatchNorm that directly follows a Linear/Conv into it, for inference
    (the eval-mode output kept within float tolerance; the module docstring).

    Args:
        inplace: change ``model`` itself; by default a deep copy is folded.
        by_name: when the model can be neither traced (torch.fx) nor run, also pair
            siblings by name (``conv1``/``bn1``), an assumption the report notes.
        check_input: an example input: pairs by a forward trace when torch.fx cannot
            trace the model, and a fold is kept only if the output on it is unchanged.

    Example: ``fold_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))[1]``
    is ``nn.Identity()``.
    """
    return fold_batchnorm_with_report(
        model, inplace=inplace, by_name=by_name, check_input=check_input
    )[0]


def _stay_in_eval(module: nn.Module, args: object) -> None:
    if getattr(module, "_covshift_frozen", False) and module.training:
        module.train(False)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Freeze every BatchNorm-kind layer, statistics and affine, in place: eval mode that
    survives ``model.train()`` (a forward pre-hook), ``requires_grad=False``."""
    for m in model.modules():
        if not _is_batch_norm(m):
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
