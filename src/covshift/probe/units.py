"""Which axis of a layer's values holds its units, found layer by layer.

A *unit* is a feature of a fully connected layer or a channel of a convolution: the
probe summarizes the values of each unit separately. Which axis of a captured tensor
holds the units depends on the layer, not on the model: in a ConvNeXt block the
depthwise convolution's values are ``(N, C, H, W)`` (units on axis 1) and the
LayerNorm and Linear layers after the permute see ``(N, H, W, C)`` (units last); a
transformer's values are ``(N, T, C)``, whose axis 1 holds token positions, not units.

With ``unit_dim="auto"`` (the probe's default) the axis of each record is found by the
first of these rules that applies; :class:`UnitAxis` says which one did (its
``source``) and why (its ``rule``):

1. ``"given"``: the user's ``unit_dim``: an int for every layer, or a mapping from
   module-name globs (:func:`~covshift.probe.select.glob_match`; the first pattern
   that matches wins) to an axis or ``"auto"``. What the user gives wins over what the
   layer says; when the two disagree the rule says so and the probe warns.
2. ``"layer"``: the layer's own feature count and where its definition puts it:

   - ``nn.Linear`` (``in_features`` / ``out_features``), ``nn.Bilinear``, transformers'
     ``Conv1D`` (``weight`` of shape ``(nx, nf)``), ``nn.Embedding`` (output),
     ``nn.MultiheadAttention`` (``embed_dim``): the last axis;
   - convolutions (``in_channels`` / ``out_channels``): axis 1;
   - norms: ``data_format`` (``"channels_first"`` / ``"channels_last"``, transformers'
     ConvNeXt), ``channel_dim`` or ``channels_last`` attributes when the layer has them;
     else ``num_features`` (BatchNorm, InstanceNorm) and ``num_channels`` (GroupNorm):
     axis 1; ``normalized_shape`` (LayerNorm, RMSNorm): its first normalized axis
     (the last for ``(C,)``), except for a class named ``...2d``/``...3d`` (timm's
     ``LayerNorm2d``, which permutes NCHW values itself): axis 1; a norm that has only
     a 1-D ``weight`` (a Llama RMSNorm): the one axis of that size; a norm wrapping one
     norm (``NoisyNorm``): the wrapped one's.

   The size of the tensor along that axis must equal the layer's count. If it does
   not, and exactly one other axis has that size, that axis is used (a channels-first
   norm that does not say so) and the probe warns; otherwise the layer's claim is
   dropped (and the probe warns) and the next rules decide.
3. ``"producer"``: a layer that says nothing (an activation, dropout, a custom module)
   takes the axis of the layer that produced its input tensor, directly or through
   modules that keep the shape (the ``Linear`` before a ``GELU``). With
   ``record="output"`` this needs the output to have the input's shape.
4. ``"only"``: values ``(N, F)`` have one axis after the batch axis: axis 1.
5. ``"assumed"``: the axis of the last layer before it, in this forward, whose output
   had the same shape (the ReLU after a ResNet's residual sum follows the BatchNorm
   before the sum); else axis 1, the default. The probe warns, once per layer.

The producer rules need the output of every module of the forward: while a record is
taken, a forward hook on every module notes the unit axis of its output (weak
references, so no tensor outlives the forward). The hooks are only attached when a
watched layer has no axis of its own and ``unit_dim`` leaves it to ``"auto"``.

This module makes the decision (:func:`resolve_unit_axis`); the pieces it is made of
each have a module of their own, and are all importable from here:

- :mod:`~covshift.probe.units_axis`: the record, :class:`UnitAxis`, and its errors;
- :mod:`~covshift.probe.units_policy`: rule 1, the user's ``unit_dim``
  (:class:`UnitPolicy`);
- :mod:`~covshift.probe.units_declared`: rule 2, what each type of layer says
  (:func:`layer_claim`) and whether it fits the tensor (:func:`place_claim`);
- :mod:`~covshift.probe.units_trace`: rules 3 and 5, the producers of the forward's
  tensors (:class:`UnitTrace`).
"""

from __future__ import annotations

import torch
from torch import nn

# Imported here (and listed in __all__) so that covshift.probe.units stays the one
# place to import any piece of the unit rules from.
from covshift.probe.units_axis import (
    SOURCES,
    UnitAxis,
    UnitAxisError,
    UnitAxisWarning,
    _axis_text,
    store_columns,
)
from covshift.probe.units_declared import UnitClaim, layer_claim, place_claim
from covshift.probe.units_policy import UnitDim, UnitPolicy
from covshift.probe.units_trace import UnitTrace

__all__ = [
    "SOURCES",
    "UnitAxis",
    "UnitAxisError",
    "UnitAxisWarning",
    "UnitClaim",
    "UnitDim",
    "UnitPolicy",
    "UnitTrace",
    "layer_claim",
    "place_claim",
    "resolve_unit_axis",
    "store_columns",
]

# Axis 1 when nothing says otherwise: the channels of (N, C, ...), the probe's default
# before units were found per layer.
DEFAULT_AXIS = 1


def resolve_unit_axis(
    name: str,
    module: nn.Module,
    value: torch.Tensor,
    side: str,
    policy: UnitPolicy,
    trace: UnitTrace | None = None,
    feed: torch.Tensor | None = None,
) -> UnitAxis:
    """The unit axis of ``value``, the ``side`` (``"input"``/``"output"``) tensor of
    layer ``name`` (see the module docstring for the rules).

    Args:
        name: the record key (``name#k`` for repeated calls).
        module: the layer.
        value: the recorded tensor ``(N, ...)``.
        side: ``"input"`` or ``"output"``.
        policy: the user's ``unit_dim``.
        trace: the producers of this forward's tensors (None: not traced).
        feed: the tensor the layer received (the undetached ``value`` itself for
            ``side="input"``), looked up in ``trace``.
    """
    shape = tuple(value.shape)
    ndim = len(shape)
    claim = layer_claim(module, side)
    own, problem = (None, "") if claim is None else place_claim(claim, shape)
    source = None
    if trace is not None and feed is not None and tuple(feed.shape) == shape:
        source = trace.lookup(feed)
        if source is not None and source.dim >= ndim:
            source = None
    given = policy.given(name)
    if given is not None:
        axis, how = given
        if not -ndim <= axis < ndim or axis % ndim == 0:
            raise UnitAxisError(
                f"probe: {how} does not fit the {side} of layer {name!r}, of shape "
                f"{tuple(shape)}: use an axis from 1 to {ndim - 1} (or -1 ... -{ndim - 1})"
                + (f"; the layer says {own}" if own is not None else "")
            )
        dim = axis % ndim
        rule = f"{how}: {_axis_text(dim, shape)}"
        doubt = ""
        if own is not None and own.dim != dim and own.doubt and shape[dim] == own.size:
            rule += f"; the layer alone is ambiguous ({own.rule})"
        elif own is not None and own.dim != dim:
            doubt = f"{how} gives axis {dim}, but {own.rule}"
            rule += f"; the layer says otherwise ({own.rule})"
        elif own is None and claim is None and source is not None and source.dim != dim:
            said = f"{source.origin!r}, which produced its input, has its units on axis "
            said += f"{source.dim} ({source.text})"
            doubt = f"{how} gives axis {dim}, but {said}"
            rule += f"; but {said}"
        elif own is None and problem:
            rule += f"; {problem}"
        return UnitAxis(dim, shape[dim], "given", rule, doubt)
    if own is not None:
        return own
    note = f" ({problem})" if problem else ""
    if source is not None:
        rule = (
            f"follows {source.origin!r}, which produced its input ({source.text}): "
            f"{_axis_text(source.dim, shape)}{note}"
        )
        return UnitAxis(source.dim, shape[source.dim], "producer", rule, problem)
    if ndim == 2:
        return UnitAxis(1, shape[1], "only", f"the one axis after the batch axis{note}", problem)
    if trace is not None:
        near = trace.nearest(shape)
        if near is not None:
            rule = (
                f"as {near.origin!r} ({near.text}), the last layer before it with an "
                f"output of this shape: {_axis_text(near.dim, shape)}{note}"
            )
            return UnitAxis(near.dim, shape[near.dim], "assumed", rule, f"assumed {rule}")
    rule = f"the default, {_axis_text(DEFAULT_AXIS, shape)}; nothing before it says{note}"
    return UnitAxis(DEFAULT_AXIS, shape[DEFAULT_AXIS], "assumed", rule, f"assumed {rule}")
