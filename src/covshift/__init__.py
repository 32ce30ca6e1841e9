"""covshift: measure internal covariate shift and compare normalization layers.

Public API (see each module for details)::

    from covshift import load_dataset, build_mlp, train, TrainConfig, Store, ShiftProbe

    data = load_dataset("fashion-mnist")  # or "mnist" (a folder), "synthetic"
    net = build_mlp(784, 10, width=100, depth=3, activation="sigmoid", norm="batch")
    probe = ShiftProbe(net, ["hidden.*.act"], data.x_test[:1000], every=100)
    with probe:
        train(net, data, TrainConfig(steps=5000, lr=0.5), callbacks=[probe])
    print(probe.records[-1].stats["quantiles"].shape)  # (3 percentiles, 100 units)

The subpackages hold the rest: :mod:`covshift.nn` (normalization layers),
:mod:`covshift.probe`, :mod:`covshift.store`, :mod:`covshift.experiments`,
:mod:`covshift.report`.

Each name is imported on first use, so ``import covshift`` does not load torch (the
store, for one, never needs it).
"""

from __future__ import annotations

import importlib
import types

from covshift._version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (startup time)
if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on demand
    from covshift.data import Dataset, load_dataset
    from covshift.models import build_cnn, build_mlp
    from covshift.probe import ShiftProbe
    from covshift.store import Store, StoreError
    from covshift.training import TrainConfig, TrainResult, train

# Each public name and the module that defines it.
_SOURCES = {
    "Dataset": "covshift.data",
    "load_dataset": "covshift.data",
    "build_cnn": "covshift.models",
    "build_mlp": "covshift.models",
    "ShiftProbe": "covshift.probe",
    "Store": "covshift.store",
    "StoreError": "covshift.store",
    "TrainConfig": "covshift.training",
    "TrainResult": "covshift.training",
    "train": "covshift.training",
}

__all__ = [
    "Dataset",
    "ShiftProbe",
    "Store",
    "StoreError",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "build_cnn",
    "build_mlp",
    "load_dataset",
    "train",
]


def __getattr__(name: str) -> object:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later look-ups find it without calling this
    return value


def __dir__() -> list[str]:
    # The public names and the subpackages imported so far (not this file's helpers).
    loaded = [
        name
        for name, value in globals().items()
        if isinstance(value, types.ModuleType) and value.__name__.startswith(f"{__name__}.")
    ]
    return sorted({*__all__, *loaded})
