"""The sections of an experiment configuration (``[model]``, ``[optimizer]``,
``[probe]``, ...), each a strict pydantic model: unknown keys are errors, and types are
not coerced (``true`` is not 1, ``"8"`` is not 8; an integer is a valid float).
:class:`~covshift.experiments.config.ExperimentConfig` holds them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_SEED",
    "MAX_SEED_COUNT",
    "BatterySpec",
    "ConfigError",
    "DivergenceSpec",
    "ModelSpec",
    "NetworkSpec",
    "OptimizerSpec",
    "ProbeSpec",
    "ReportSpec",
    "SizeSpec",
    "Strict",
]

MAX_SEED = 2**63 - 1  # the store's INTEGER is a signed 64-bit number
# Deeper stacks are refused: building, probing and timing one in the preflight alone
# takes minutes (~1 ms per layer per pass on a CPU core), before a step is trained.
MAX_DEPTH = 10_000
# A count of seeds builds a grid of that many points before anything else is checked.
MAX_SEED_COUNT = 10_000


class ConfigError(Exception):
    """A preset or an override is invalid; the message names the file and the field."""


class Strict(BaseModel):
    # allow_inf_nan=False: an infinite learning rate or init scale is a mistake that
    # would otherwise surface only as a failed or diverged run.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Activation = Literal["sigmoid", "tanh", "relu", "identity", "linear"]


class ModelSpec(Strict):
    """The network architecture (see :mod:`covshift.models`).

    ``kind``: ``mlp`` (``width`` x ``depth`` hidden layers), ``cnn`` (``channels``),
    ``vgg`` (``depth`` 3x3 convs, ``width`` channels in the first stage, doubling per
    stage of ``convs_per_stage``) or ``linear`` (Santurkar et al.'s deep linear
    network: ``depth`` bias-free maps, the hidden ones of ``width`` units: set it
    to the input size for Santurkar's square maps; ``activation`` is ignored).
    ``freeze``: glob patterns of module names whose parameters are not trained
    (``"hidden.0.*"``); each must match a parameter.
    """

    kind: Literal["mlp", "cnn", "vgg", "linear"] = "mlp"
    width: StrictInt = Field(100, ge=1)
    depth: StrictInt = Field(3, ge=1, le=MAX_DEPTH)
    channels: tuple[StrictInt, ...] = (16, 32, 64)
    pool: Literal["avg", "flatten"] = "avg"  # the cnn head's input
    convs_per_stage: StrictInt = Field(2, ge=1)
    activation: Activation = "sigmoid"
    norm: str = "none"
    norm_position: Literal["before", "after"] = "before"
    init: Literal["gaussian", "xavier", "he", "torch"] = "gaussian"
    init_std: StrictFloat = Field(0.1, gt=0)
    norm_kwargs: dict[str, float | int | bool | str | None] = Field(default_factory=dict)
    freeze: tuple[str, ...] = ()

    @field_validator("norm")
    @classmethod
    def _known_norm(cls, value: str) -> str:
        from covshift.nn import norm_names

        if value != "none" and value not in norm_names():
            raise ValueError(
                f"unknown normalization {value!r}; use none or one of {', '.join(norm_names())}"
            )
        return value


class NetworkSpec(Strict):
    """One network of an experiment: a label and the model fields it overrides."""

    label: str
    kind: Literal["mlp", "cnn", "vgg", "linear"] | None = None
    width: StrictInt | None = Field(None, ge=1)
    depth: StrictInt | None = Field(None, ge=1, le=MAX_DEPTH)
    norm: str | None = None
    norm_position: Literal["before", "after"] | None = None
    activation: Activation | None = None
    init_std: StrictFloat | None = Field(None, gt=0)
    norm_kwargs: dict[str, float | int | bool | str | None] | None = None
    freeze: tuple[str, ...] | None = None

    def resolve(self, base: ModelSpec) -> ModelSpec:
        """``base`` with this network's overrides applied (validated again)."""
        updates = self.model_dump(exclude={"label"}, exclude_none=True)
        return ModelSpec.model_validate({**base.model_dump(), **updates})


class OptimizerSpec(Strict):
    """SGD settings.

    ``lr_reference_batch``: when set, the learning rate is scaled linearly with the
    batch size, ``lr * batch_size / lr_reference_batch`` (Goyal et al. 2017, the rule
    Wu & He 2018 use across batch sizes); a point records the scaled rate.
    """

    lr: StrictFloat = Field(0.5, gt=0)
    momentum: StrictFloat = Field(0.0, ge=0, lt=1)
    weight_decay: StrictFloat = Field(0.0, ge=0)
    lr_reference_batch: StrictInt | None = Field(None, ge=1)


class ProbeSpec(Strict):
    """What the probe records (see :class:`covshift.probe.ShiftProbe`).

    - ``mode``: the probe batch through the network in ``eval`` mode (running
      statistics, the default), ``train`` mode (the batch's own statistics; noise
      layers draw), or ``both`` (train-mode records are stored as ``<layer>@train``).
    - ``noise_floor``: also record a second probe batch (the next ``examples`` test
      examples) at the first and last probe steps, stored as ``<layer>@floor``: the
      drift between two batches at the same weights (metric ``floor/<layer>``).
    - ``gradient_ics_every``: measure gradient ICS (Santurkar et al. 2018, Def. 2.1)
      on every weight layer every this many steps (0: never).
    - ``smoothness_every``: measure the loss landscape along the gradient every this
      many steps (0: never), step sizes in ``smoothness_range`` x lr.
    - ``measure_batch``: the batch size of those two measurements (default: training's).
    """

    layers: tuple[str, ...] = ("hidden.*.act",)
    record: Literal["input", "output"] = "input"
    every: StrictInt = Field(100, ge=1)
    examples: StrictInt = Field(1000, ge=2)
    quantiles: tuple[StrictFloat, ...] = (0.15, 0.5, 0.85)
    mode: Literal["eval", "train", "both"] = "eval"
    noise_floor: StrictBool = False
    gradient_ics_every: StrictInt = Field(0, ge=0)
    smoothness_every: StrictInt = Field(0, ge=0)
    smoothness_range: tuple[StrictFloat, StrictFloat] = (0.5, 4.0)
    measure_batch: StrictInt | None = Field(None, ge=1)

    @field_validator("smoothness_range")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] < value[1]:
            raise ValueError("smoothness_range must be (low, high) with 0 < low < high")
        return value

    @field_validator("quantiles")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if (
            len(value) < 2
            or list(value) != sorted(set(value))
            or not 0 <= value[0] <= value[-1] <= 1
        ):
            raise ValueError("quantiles must be at least two increasing levels in [0, 1]")
        return value


class ReportSpec(Strict):
    """What the report shows."""

    checkpoints: tuple[StrictInt, ...] = (1000, 5000, 10000)
    layer: str | None = None  # layer of the percentile panels; default: last probed layer
    unit: StrictInt | None = Field(None, ge=0)  # unit of the percentile panels; default: typical


class DivergenceSpec(Strict):
    """When a run counts as diverged (a measured outcome, recorded with its step).

    At every evaluation, a run has diverged when its mean training loss since the
    previous evaluation or its test loss is not finite, or exceeds ``factor`` times its
    test loss at step 0 (the initialization). With ``stop`` (the default) training ends
    there; otherwise it goes on and the run is still recorded as diverged.
    """

    factor: StrictFloat = Field(10.0, gt=1)
    stop: StrictBool = True


class SizeSpec(Strict):
    """One size of a preset (``quick``, ``full``): the overrides it applies, in the
    form of ``--set`` (dotted keys, or nested tables), and its measured runtime."""

    # training minutes on the 2-core reference machine (2 workers, empty store):
    # measured, or the preflight's estimate when ``estimated``
    minutes: StrictFloat | None = Field(None, gt=0)
    estimated: StrictBool = False
    set: dict[str, Any] = Field(default_factory=dict)


class BatterySpec(Strict):
    """How the battery pairs this experiment's points for its across-experiment claim
    (does less shift go with faster training?): a point with a norm and the point
    that differs from it only in having none, compared on their drift and on the
    steps they take to reach ``target`` of ``metric``. None: not part of it."""

    metric: Literal["test_accuracy", "test_loss"] = "test_accuracy"
    target: StrictFloat | None = None
