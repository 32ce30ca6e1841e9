"""The variants torch.nn lacks, in one import.

Each lives in its own module (one concept per file):

- :mod:`covshift.nn.renorm`: ``BatchRenorm1d/2d/3d`` (Ioffe 2017), with the
  r_max/d_max schedule;
- :mod:`covshift.nn.ghost`: ``GhostBatchNorm1d/2d/3d`` (Hoffer et al. 2017);
- :mod:`covshift.nn.noise`: ``NormNoise`` and ``NoisyNorm``, Santurkar et al.'s
  non-stationary noise after a norm layer (2018);
- :mod:`covshift.nn.weight_std`: ``WSConv2d`` and ``WSLinear`` (Qiao et al. 2019);
- :mod:`covshift.nn.sync`: ``SyncBatchNorm`` on any torch.distributed backend.
"""

from covshift.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from covshift.nn.noise import NoisyNorm, NormNoise
from covshift.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, renorm_limits
from covshift.nn.sync import SyncBatchNorm, sync_batch_norm
from covshift.nn.weight_std import WSConv2d, WSLinear, standardize_weight

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "NoisyNorm",
    "NormNoise",
    "SyncBatchNorm",
    "WSConv2d",
    "WSLinear",
    "renorm_limits",
    "standardize_weight",
    "sync_batch_norm",
]
