"""The normalization family: torch.nn's layers with covshift's forward, as their
subclasses, on one statistics core with hand-derived backward passes (``functional``);
the variants torch.nn lacks; a name registry (``create_norm``) and tools to swap
(``convert``), fold and freeze norm layers in any model. docs/nn.md.
"""

from covshift.nn import functional
from covshift.nn.convert import (
    ConversionEntry,
    ConversionReport,
    ConversionWarning,
    convert,
    convert_with_report,
)
from covshift.nn.dyt import DyT
from covshift.nn.fold import (
    fold_batchnorm,
    fold_batchnorm_with_report,
    freeze_batchnorm,
    unfreeze_batchnorm,
)
from covshift.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from covshift.nn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
)
from covshift.nn.noise import NoisyNorm, NormNoise, TimeVaryingNoise
from covshift.nn.registry import create_norm, norm_kind, norm_names, register_norm
from covshift.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from covshift.nn.sync import SyncBatchNorm
from covshift.nn.weight_std import WSConv2d, WSLinear

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ConversionEntry",
    "ConversionReport",
    "ConversionWarning",
    "DyT",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "NoisyNorm",
    "NormNoise",
    "RMSNorm",
    "SyncBatchNorm",
    "TimeVaryingNoise",
    "WSConv2d",
    "WSLinear",
    "convert",
    "convert_with_report",
    "create_norm",
    "fold_batchnorm",
    "fold_batchnorm_with_report",
    "freeze_batchnorm",
    "functional",
    "norm_kind",
    "norm_names",
    "register_norm",
    "unfreeze_batchnorm",
]
