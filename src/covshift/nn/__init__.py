"""The normalization family.

Until covshift's own layers land, the registry maps names to torch.nn's layers.
"""

from covshift.nn.registry import create_norm, norm_names, register_norm

__all__ = ["create_norm", "norm_names", "register_norm"]
