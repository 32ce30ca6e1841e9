"""covshift: measure internal covariate shift and compare normalization layers.

Public API (see each module for details)::

    from covshift import load_dataset, build_mlp, train, TrainConfig, Store
"""

from covshift._version import __version__

__all__ = ["__version__"]
