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
    model_validator,
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
ModelKind = Literal["mlp", "cnn", "vgg", "linear", "transformer"]
NormPosition = Literal["before", "after", "pre", "post"]
ModelInit = Literal["gaussian", "xavier", "he", "torch", "gpt2", "unit"]
# The fields of the MLP/CNN builders a transformer has no use for, and the other way
# round: each must keep its default, or the config would say something it does not do.
_NOT_TRANSFORMER = ("activation", "init_std", "channels", "pool", "convs_per_stage")
_TRANSFORMER_ONLY = ("heads", "context", "mlp_ratio")


class ModelSpec(Strict):
    """The network architecture (see :mod:`covshift.models`).

    ``kind``: ``mlp`` (``width`` x ``depth`` hidden layers), ``cnn`` (``channels``),
    ``vgg`` (``depth`` 3x3 convs, ``width`` channels in the first stage, doubling per
    stage of ``convs_per_stage``) or ``linear`` (Santurkar et al.'s deep linear
    network: ``depth`` bias-free maps, the hidden ones of ``width`` units: set it
    to the input size for Santurkar's square maps; ``activation`` is ignored) or
    ``transformer`` (:func:`covshift.models.build_transformer`, a GPT-style byte-level
    language model for a text dataset: ``width`` is d_model, ``depth`` the number of
    blocks, ``heads`` attention heads, ``context`` bytes per sequence, ``mlp_ratio``
    the MLP's width over d_model; ``norm`` none, layer, rms, dyt, batch or
    ghost_batch; ``norm_position`` ``pre`` (the default for it) or ``post``; ``init``
    ``gpt2`` (the default for it) or ``unit``; its MLP's activation is GELU).
    ``freeze``: glob patterns of module names whose parameters are not trained
    (``"hidden.0.*"``); each must match a parameter.
    """

    kind: ModelKind = "mlp"
    width: StrictInt = Field(100, ge=1)
    depth: StrictInt = Field(3, ge=1, le=MAX_DEPTH)
    channels: tuple[StrictInt, ...] = (16, 32, 64)
    pool: Literal["avg", "flatten"] = "avg"  # the cnn head's input
    convs_per_stage: StrictInt = Field(2, ge=1)
    activation: Activation = "sigmoid"
    norm: str = "none"
    norm_position: NormPosition = "before"
    init: ModelInit = "gaussian"
    init_std: StrictFloat = Field(0.1, gt=0)
    norm_kwargs: dict[str, float | int | bool | str | None] = Field(default_factory=dict)
    freeze: tuple[str, ...] = ()
    heads: StrictInt = Field(4, ge=1)  # transformer: attention heads
    context: StrictInt = Field(128, ge=1)  # transformer: bytes per sequence
    mlp_ratio: StrictInt = Field(4, ge=1)  # transformer: MLP width / d_model

    @model_validator(mode="before")
    @classmethod
    def _transformer_defaults(cls, data: Any) -> Any:
        # A transformer's own defaults where the MLP's would not fit it.
        if isinstance(data, dict) and data.get("kind") == "transformer":
            data = {"norm_position": "pre", "init": "gpt2", **data}
        return data

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ModelSpec:
        defaults = ModelSpec.model_fields
        if self.kind == "transformer":
            from covshift.models.transformer import TRANSFORMER_NORMS

            for name in _NOT_TRANSFORMER:
                if getattr(self, name) != defaults[name].default:
                    raise ValueError(
                        f"{name}: a transformer does not use it (its MLP's activation is "
                        f"GELU, its init gpt2 or unit); remove {name}"
                    )
            if self.norm not in TRANSFORMER_NORMS:
                raise ValueError(
                    f"norm: a transformer takes {', '.join(TRANSFORMER_NORMS)}; got {self.norm!r}"
                )
            if self.norm_position not in ("pre", "post"):
                raise ValueError(
                    f"norm_position: a transformer's norm is placed pre or post (around its "
                    f"residual branches); got {self.norm_position!r}"
                )
            if self.init not in ("gpt2", "unit"):
                raise ValueError(f"init: a transformer's init is gpt2 or unit; got {self.init!r}")
            if self.width % self.heads:
                raise ValueError(
                    f"width (d_model) = {self.width} must be a multiple of heads = {self.heads}"
                )
            return self
        for name in _TRANSFORMER_ONLY:
            if getattr(self, name) != defaults[name].default:
                raise ValueError(f"{name}: only a transformer has it (kind = {self.kind!r})")
        if self.norm_position not in ("before", "after"):
            raise ValueError(
                f"norm_position: before or after the activation; got {self.norm_position!r} "
                "(pre and post are a transformer's)"
            )
        if self.init in ("gpt2", "unit"):
            raise ValueError(f"init: {self.init!r} is a transformer's init; kind = {self.kind!r}")
        return self

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
    kind: ModelKind | None = None
    width: StrictInt | None = Field(None, ge=1)
    depth: StrictInt | None = Field(None, ge=1, le=MAX_DEPTH)
    norm: str | None = None
    norm_position: NormPosition | None = None
    activation: Activation | None = None
    init: ModelInit | None = None
    init_std: StrictFloat | None = Field(None, gt=0)
    norm_kwargs: dict[str, float | int | bool | str | None] | None = None
    freeze: tuple[str, ...] | None = None

    def resolve(self, base: ModelSpec) -> ModelSpec:
        """``base`` with this network's overrides applied (validated again)."""
        updates = self.model_dump(exclude={"label"}, exclude_none=True)
        return ModelSpec.model_validate({**base.model_dump(), **updates})


class OptimizerSpec(Strict):
    """The optimizer: ``kind`` ``sgd`` (with ``momentum``) or ``adamw`` (with
    ``betas``); ``weight_decay`` is SGD's L2 penalty or AdamW's decoupled decay.

    ``lr_reference_batch``: when set, the learning rate is scaled linearly with the
    batch size, ``lr * batch_size / lr_reference_batch`` (Goyal et al. 2017, the rule
    Wu & He 2018 use across batch sizes); a point records the scaled rate.
    ``warmup_steps``: the learning rate rises linearly from ``lr / warmup_steps`` to
    ``lr`` over the first this many steps (0: none), then stays there, or with
    ``decay = "cosine"`` falls to 0 along a half cosine over the remaining steps
    (Loshchilov & Hutter 2017, no restarts: :func:`covshift.optimizers.learning_rate`).
    """

    lr: StrictFloat = Field(0.5, gt=0)
    momentum: StrictFloat = Field(0.0, ge=0, lt=1)
    weight_decay: StrictFloat = Field(0.0, ge=0)
    lr_reference_batch: StrictInt | None = Field(None, ge=1)
    kind: Literal["sgd", "adamw"] = "sgd"
    betas: tuple[StrictFloat, StrictFloat] = (0.9, 0.999)
    warmup_steps: StrictInt = Field(0, ge=0)
    decay: Literal["none", "cosine"] = "none"

    @model_validator(mode="after")
    def _fields_of_kind(self) -> OptimizerSpec:
        if self.kind != "sgd" and self.momentum != 0:
            raise ValueError(f"momentum is SGD's; {self.kind} has betas (beta1 is its momentum)")
        if self.kind == "sgd" and self.betas != (0.9, 0.999):
            raise ValueError('betas are AdamW\'s; set kind = "adamw" or remove betas')
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        return self


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
    - ``measure_batch``: the batch size of those measurements (default: training's).
    - ``gradient_norm_steps``: record every weight layer's gradient norm
      ``||dL/dW||`` at these steps (``[0]``: at initialization; Xiong et al. 2020),
      on a training batch (metric ``grad_norm/<step>/<layer>``).
    - ``batch_stats_every``: every this many steps (0: never), measure how much each
      BatchNorm layer's batch statistics fluctuate over ``batch_stats_batches``
      training batches at fixed weights (Shen et al. 2020; metric
      ``batch_stats/<figure>/<layer|mean>``).
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
    gradient_norm_steps: tuple[StrictInt, ...] = ()
    batch_stats_every: StrictInt = Field(0, ge=0)
    batch_stats_batches: StrictInt = Field(8, ge=2)

    @field_validator("gradient_norm_steps")
    @classmethod
    def _steps(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if list(value) != sorted(set(value)) or any(v < 0 for v in value):
            raise ValueError(
                "gradient_norm_steps must be increasing steps >= 0 (0: at initialization)"
            )
        return value

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
    steps they take to reach ``target`` of ``metric``. None: not part of it.

    ``where`` pairs only the points at these axis values (``"largest"`` or
    ``"smallest"``: that end of a numeric axis), where other values of an axis repeat
    a condition rather than add one (two training budgets of the same runs: their
    pairs would be counted as independent)."""

    metric: Literal["test_accuracy", "test_loss"] = "test_accuracy"
    target: StrictFloat | None = None
    where: dict[str, Any] = Field(default_factory=dict)
