"""The experiment configuration schema (pydantic), read from TOML presets.

An experiment trains several *networks* that share one model spec and differ only in
the fields each network overrides (e.g. ``norm``), over a grid: the product of the
networks, the sweep axes (:mod:`covshift.experiments.axes`) and the seeds. Points
that share a seed share the batches and, where the shapes allow, the initial weights,
so differences between networks pair by seed. Every field is validated; unknown
fields are errors, so a typo in a preset or in ``--set`` is caught with the field's
path in the message, before anything runs.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from covshift.experiments.axes import closest, flatten_sweep, set_dotted
from covshift.experiments.claim_spec import ClaimSpec
from covshift.experiments.metrics import TRAIN_MODE, parse_metric

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "MAX_DEPTH",
    "MAX_SEED",
    "MAX_SEED_COUNT",
    "ClaimSpec",
    "ConfigError",
    "DivergenceSpec",
    "ExperimentConfig",
    "ModelSpec",
    "NetworkSpec",
    "OptimizerSpec",
    "ProbeSpec",
    "ReportSpec",
    "apply_overrides",
    "load_config",
    "preset_names",
    "preset_path",
]

PRESET_DIR = Path(__file__).parent / "presets"
MAX_SEED = 2**63 - 1  # the store's INTEGER is a signed 64-bit number
# Deeper stacks are refused: building, probing and timing one in the preflight alone
# takes minutes (~1 ms per layer per pass on a CPU core), before a step is trained.
MAX_DEPTH = 10_000
# A count of seeds builds a grid of that many points before anything else is checked.
MAX_SEED_COUNT = 10_000


class ConfigError(Exception):
    """A preset or an override is invalid; the message names the file and the field."""


class _Strict(BaseModel):
    # allow_inf_nan=False: an infinite learning rate or init scale is a mistake that
    # would otherwise surface only as a failed or diverged run.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Activation = Literal["sigmoid", "tanh", "relu", "identity", "linear"]


class ModelSpec(_Strict):
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


class NetworkSpec(_Strict):
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


class OptimizerSpec(_Strict):
    """SGD settings.

    ``lr_reference_batch``: when set, the learning rate is scaled linearly with the
    batch size, ``lr * batch_size / lr_reference_batch`` (Goyal et al. 2017, the rule
    Wu & He 2018 use across batch sizes); a point records the scaled rate.
    """

    lr: StrictFloat = Field(0.5, gt=0)
    momentum: StrictFloat = Field(0.0, ge=0, lt=1)
    weight_decay: StrictFloat = Field(0.0, ge=0)
    lr_reference_batch: StrictInt | None = Field(None, ge=1)


class ProbeSpec(_Strict):
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


class ReportSpec(_Strict):
    """What the report shows."""

    checkpoints: tuple[StrictInt, ...] = (1000, 5000, 10000)
    layer: str | None = None  # layer of the percentile panels; default: last probed layer
    unit: StrictInt | None = Field(None, ge=0)  # unit of the percentile panels; default: typical


class DivergenceSpec(_Strict):
    """When a run counts as diverged (a measured outcome, recorded with its step).

    At every evaluation, a run has diverged when its mean training loss since the
    previous evaluation or its test loss is not finite, or exceeds ``factor`` times its
    test loss at step 0 (the initialization). With ``stop`` (the default) training ends
    there; otherwise it goes on and the run is still recorded as diverged.
    """

    factor: StrictFloat = Field(10.0, gt=1)
    stop: StrictBool = True


_DEFAULT_STEPS = 50_000
_DEFAULT_EVAL_EVERY = 500


class SizeSpec(_Strict):
    """One size of a preset (``quick``, ``full``): the overrides it applies, in the
    form of ``--set`` (dotted keys, or nested tables), and its measured runtime."""

    # training minutes on the 2-core reference machine (2 workers, empty store):
    # measured, or the preflight's estimate when ``estimated``
    minutes: StrictFloat | None = Field(None, gt=0)
    estimated: StrictBool = False
    set: dict[str, Any] = Field(default_factory=dict)


class BatterySpec(_Strict):
    """How the battery pairs this experiment's points for its across-experiment claim
    (does less shift go with faster training?): a point with a norm and the point
    that differs from it only in having none, compared on their drift and on the
    steps they take to reach ``target`` of ``metric``. None: not part of it."""

    metric: Literal["test_accuracy", "test_loss"] = "test_accuracy"
    target: StrictFloat | None = None


class ExperimentConfig(_Strict):
    """A whole experiment, as read from a preset and overridden from the command line.

    ``seeds`` is a list of seeds, or a count ``N`` for seeds ``0 .. N-1`` (a single
    ``seed = S``, the form of covshift 0.1, means ``seeds = [S]``). ``sweep`` maps
    dotted field names to the values of an axis (see :mod:`covshift.experiments.axes`).
    """

    # The experiment id and its report folder are named after it: no path separators.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    title: str
    description: str = ""
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    seeds: tuple[StrictInt, ...] = (0,)
    steps: StrictInt = Field(_DEFAULT_STEPS, ge=1)
    batch_size: StrictInt = Field(60, ge=1)
    eval_every: StrictInt = Field(_DEFAULT_EVAL_EVERY, ge=1)
    # Training length in examples instead of steps (steps = examples // batch_size),
    # and evaluations every eval_examples examples: what stays fixed when the batch
    # size is swept.
    examples: StrictInt | None = Field(None, ge=1)
    eval_examples: StrictInt | None = Field(None, ge=1)
    # Evaluate on the first test_examples test examples only (None: the whole test set):
    # for networks whose full evaluation costs more than their training steps.
    test_examples: StrictInt | None = Field(None, ge=1)
    device: str = "auto"
    model: ModelSpec = ModelSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    probe: ProbeSpec = ProbeSpec()
    divergence: DivergenceSpec = DivergenceSpec()
    report: ReportSpec = ReportSpec()
    # Without a [networks] table, one network of the model as written (a sweep over
    # model.norm, say, needs no more).
    networks: dict[str, NetworkSpec] = Field(
        default_factory=lambda: {"default": NetworkSpec(label="default")}
    )
    sweep: dict[str, tuple[Any, ...]] = Field(default_factory=dict)
    # Settings the paper leaves open: setting -> why this value (printed in the report).
    choices: dict[str, str] = Field(default_factory=dict)
    claims: tuple[ClaimSpec, ...] = ()
    sizes: dict[str, SizeSpec] = Field(default_factory=dict)
    size: str | None = None  # the size applied (set by load_config)
    battery: BatterySpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _seeds_and_axes(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "seed" in data:
            if "seeds" in data:
                raise ValueError("give seeds (a list or a count) or seed, not both")
            data["seeds"] = [data.pop("seed")]
        seeds = data.get("seeds")
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds < 1:
                raise ValueError(f"seeds = {seeds}: a count of seeds must be at least 1")
            if seeds > MAX_SEED_COUNT:
                raise ValueError(
                    f"seeds = {seeds}: a count of seeds must be at most {MAX_SEED_COUNT:,}"
                )
            data["seeds"] = list(range(seeds))
        if "sweep" in data:
            data["sweep"] = flatten_sweep(data["sweep"], _SWEEPABLE)
        return data

    @field_validator("seeds")
    @classmethod
    def _seed_values(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("give at least one seed")
        for s in value:
            if not 0 <= s <= MAX_SEED:
                raise ValueError(f"seed {s} is out of range; seeds are integers in [0, 2**63)")
        if len(set(value)) != len(value):
            raise ValueError(f"seeds {list(value)} repeat a seed")
        return value

    def resolved_steps(self) -> tuple[int, int]:
        """``(steps, eval_every)``, from ``examples`` / ``eval_examples`` when set."""
        steps = self.steps if self.examples is None else self.examples // self.batch_size
        every = (
            self.eval_every
            if self.eval_examples is None
            else max(1, self.eval_examples // self.batch_size)
        )
        return steps, every

    def resolved_lr(self) -> float:
        """The learning rate a point trains with (linearly scaled with the batch size
        when ``optimizer.lr_reference_batch`` is set)."""
        ref = self.optimizer.lr_reference_batch
        return self.optimizer.lr if ref is None else self.optimizer.lr * self.batch_size / ref

    @model_validator(mode="after")
    def _networks_axes_claims(self) -> ExperimentConfig:
        if self.examples is not None:
            # (a re-validated dump carries the default steps: only another value clashes)
            if "steps" in self.model_fields_set and self.steps != _DEFAULT_STEPS:
                raise ValueError(
                    "give steps or examples (steps = examples // batch_size), not both"
                )
            if self.examples < self.batch_size:
                raise ValueError(
                    f"examples = {self.examples} is fewer than one batch of {self.batch_size}"
                )
        if (
            self.eval_examples is not None
            and "eval_every" in self.model_fields_set
            and self.eval_every != _DEFAULT_EVAL_EVERY
        ):
            raise ValueError("give eval_every or eval_examples, not both")
        if self.size is not None and self.size not in self.sizes:
            raise ValueError(
                f"size {self.size!r} is not a size of this preset; sizes: "
                f"{', '.join(self.sizes) or 'none'}"
            )
        if not self.networks:
            raise ValueError("networks: at least one network is needed")
        for key, net in self.networks.items():
            try:
                net.resolve(self.model)
            except ValidationError as e:
                raise ValueError(f"networks.{key}: {_first_error(e)}") from None
        self._check_axes()
        ids = [c.id for c in self.claims if c.id is not None]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"claims: the ids {repeated} are given to more than one claim")
        for i, claim in enumerate(self.claims):
            self._check_claim(i, claim)
        return self

    def _check_axes(self) -> None:
        """Each axis value, applied alone to this configuration, must validate, and no
        network may override a swept model field (it would silently win)."""
        if not self.sweep:
            return
        base = self.model_dump(exclude={"sweep", "claims"})
        for key, values in self.sweep.items():
            section, _, field = key.partition(".")
            if section == "model" and "." not in field:
                for net_key, net in self.networks.items():
                    if getattr(net, field, None) is not None:
                        raise ValueError(
                            f"sweep.{key}: network {net_key!r} sets {field} itself; "
                            f"sweep it or set it per network, not both"
                        )
            for i, value in enumerate(values):
                try:
                    ExperimentConfig.model_validate(set_dotted(base, key, value))
                except ValidationError as e:
                    raise ValueError(f"sweep.{key}[{i}] = {value!r}: {_first_error(e)}") from None

    def _check_claim(self, i: int, claim: ClaimSpec) -> None:
        where = f"claims[{i}]"
        for role, net in (("network", claim.network), ("baseline", claim.baseline)):
            if net is not None and net not in self.networks:
                raise ValueError(
                    f"{where}.{role}: {net!r} is not a network{closest(net, list(self.networks))};"
                    f" networks: {', '.join(self.networks)}"
                )
        for role, path in (("metric", claim.metric), ("baseline_metric", claim.baseline_metric)):
            if path is not None:
                self._check_measured(f"{where}.{role}", path)
        axes = list(self.sweep)
        for key, value in [*claim.where.items(), *claim.baseline_where.items()]:
            if key not in self.sweep:
                raise ValueError(
                    f"{where}.where: {key!r} is not a sweep axis{closest(key, axes)}; "
                    f"axes: {', '.join(axes) or 'none'}"
                )
            if value not in self.sweep[key]:
                raise ValueError(
                    f"{where}.where: {key} = {value!r} is not on the axis {list(self.sweep[key])}"
                )
        if claim.axis is not None:
            if claim.axis not in self.sweep:
                raise ValueError(
                    f"{where}.axis: {claim.axis!r} is not a sweep axis"
                    f"{closest(claim.axis, axes)}; axes: {', '.join(axes) or 'none'}"
                )
            values = self.sweep[claim.axis]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{where}.axis: {claim.axis} has non-numeric values {values}")
            if claim.log_axis and min(values) <= 0:
                raise ValueError(f"{where}.log_axis: {claim.axis} has values <= 0")
            if len(values) < 2:
                raise ValueError(f"{where}.axis: {claim.axis} needs at least two values")

    def _probe_values(self, field: str) -> list[Any]:
        """The values a probe field takes in this experiment (its own and its axis')."""
        return [getattr(self.probe, field), *self.sweep.get(f"probe.{field}", ())]

    def _check_measured(self, where: str, path: str) -> None:
        """A claim's metric must be one the probe is set to measure: otherwise every
        estimate would be "not measured", found only after the whole run."""
        metric = parse_metric(path.replace("/*", "/last"))
        needs: list[tuple[str, bool, str]] = []
        if metric.kind == "ics":
            on = any(v > 0 for v in self._probe_values("gradient_ics_every"))
            needs.append(("probe.gradient_ics_every", on, "a step count > 0"))
        if metric.kind == "smooth":
            on = any(v > 0 for v in self._probe_values("smoothness_every"))
            needs.append(("probe.smoothness_every", on, "a step count > 0"))
        if metric.kind == "floor":
            on = any(self._probe_values("noise_floor"))
            needs.append(("probe.noise_floor", on, "true"))
        if metric.layer is not None and metric.layer.endswith(TRAIN_MODE):
            on = any(v in ("train", "both") for v in self._probe_values("mode"))
            needs.append(("probe.mode", on, '"train" or "both"'))
        for field, on, value in needs:
            if not on:
                raise ValueError(
                    f"{where}: {path} is not measured by this experiment; set {field} to "
                    f"{value} (or claim another metric)"
                )


_SWEEPABLE: dict[str, list[str]] = {
    "model": list(ModelSpec.model_fields),
    "optimizer": list(OptimizerSpec.model_fields),
    "probe": list(ProbeSpec.model_fields),
    "divergence": list(DivergenceSpec.model_fields),
}


def _where(err: Any) -> str:
    """``claims[0].rule`` from pydantic's ``("claims", 0, "rule")``."""
    out = ""
    for part in err["loc"]:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# pydantic's type errors, and how to say what was given instead
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
}


def _given(value: Any) -> str:
    """How TOML would have written ``value``, and what kind of value it is."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f'"{value}" (a string: drop the quotes if a number or boolean was meant)'
    if isinstance(value, float):
        return f"{value!r} (a number with a fraction)"
    return f"{value!r} ({type(value).__name__})"


def _message(err: Any) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field" + _suggestion(err)
    elif err["type"] in _EXPECTED:
        # Types are strict (no true -> 1, no "8" -> 8): say what was given.
        msg = f"expected {_EXPECTED[err['type']]}, got {_given(err.get('input'))}"
    return msg


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation is, directly or as ``Model | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if _model_in(arg) is not None:
                return _model_in(arg)
    return None


def _step(annotation: Any, part: str | int) -> Any:
    """The annotation one location part below ``annotation`` (a model's field, a dict's
    value, a tuple's item), or None where the path leaves the schema."""
    model = _model_in(annotation)
    if model is not None:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is dict and len(args) == 2:
        return args[1]
    if origin in (tuple, list) and args:
        return args[0]
    if len(args) == 1:  # Container | None
        return _step(args[0], part)
    return None


def _suggestion(err: Any) -> str:
    """For an unknown field: the valid fields of its section and the closest one."""
    loc = list(err["loc"])
    name = str(loc[-1]) if loc else ""
    annotation: Any = ExperimentConfig
    for part in loc[:-1]:
        annotation = _step(annotation, part)
        if annotation is None:
            return ""
    section = _model_in(annotation)
    if section is None:
        return ""
    fields = list(section.model_fields)
    return f"{closest(name, fields)}; valid keys here: {', '.join(fields)}"


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = _where(err)
    return f"{where}: {_message(err)}" if where else _message(err)


def _format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = _where(err)
        lines.append(f"  {where}: {_message(err)}" if where else f"  {_message(err)}")
    return "\n".join(lines)


def preset_names() -> list[str]:
    """Names of the presets shipped with covshift."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name_or_path: str) -> Path:
    """The TOML file of a shipped preset, or the path itself if it is a ``.toml`` file."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; give the path of a .toml file")
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        return path
    path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset {name_or_path!r}; shipped presets: "
            f"{', '.join(preset_names())} (or give a path to a .toml file)"
        )
    return path


def _parse_value(text: str) -> Any:
    """An override value in TOML syntax (numbers, booleans, quoted strings, arrays);
    anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``optimizer.lr``) in a raw config mapping; returns a new mapping."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part!r} is a value, not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = _parse_value(value) if isinstance(value, str) else value
    return out


def read_preset(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """The file of a preset and its TOML table, unvalidated."""
    path = preset_path(name_or_path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return path, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a size's overrides, as ``--set`` keys)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def apply_size(path: Path, raw: dict[str, Any], size: str) -> dict[str, Any]:
    """``raw`` with the overrides of its size ``size`` applied (and ``size`` recorded)."""
    sizes = raw.get("sizes")
    if not isinstance(sizes, dict) or size not in sizes:
        names = ", ".join(sizes) if isinstance(sizes, dict) else "none"
        raise ConfigError(f"{path}: has no size {size!r}; its sizes: {names}")
    table = sizes[size]
    changes_table = table.get("set", {}) if isinstance(table, dict) else {}
    if not isinstance(table, dict) or not isinstance(changes_table, dict):
        raise ConfigError(
            f"{path}: sizes.{size} must be a table with a [sizes.{size}.set] table of the "
            "fields it changes (e.g. set.steps = 1000)"
        )
    changes = _flatten(changes_table)
    if "seeds" in changes or "seed" in changes:
        raw = {k: v for k, v in raw.items() if k not in ("seed", "seeds")}
    if "examples" in changes:
        raw = {k: v for k, v in raw.items() if k != "steps"}
    if "steps" in changes:
        raw = {k: v for k, v in raw.items() if k != "examples"}
    # An axis in a size replaces the preset's axis whole (it is a leaf of the table).
    return {**apply_overrides(raw, changes), "size": size}


def load_config(
    name_or_path: str, overrides: dict[str, Any] | None = None, *, size: str | None = None
) -> ExperimentConfig:
    """Read a preset (shipped name or .toml path), apply dotted overrides, validate.

    ``size`` applies one of the preset's ``[sizes.<name>]`` first (``quick``, ``full``).
    ``seeds`` in the overrides replaces the preset's ``seeds`` (or ``seed``). A field
    that the preset sweeps cannot be overridden by itself: override the axis
    (``sweep.optimizer.lr=[0.1]``).

    Raises:
        ConfigError: unreadable TOML (with the file and position) or invalid fields
            (each with its dotted path and what is accepted).
    """
    path, raw = read_preset(name_or_path)
    if size is not None:
        raw = apply_size(path, raw, size)
    overrides = dict(overrides or {})
    if "seeds" in overrides or "seed" in overrides:
        raw = {k: v for k, v in raw.items() if k not in ("seed", "seeds")}
    swept = raw.get("sweep")
    if isinstance(swept, dict):
        try:
            axes = flatten_sweep(swept, _SWEEPABLE)
        except ValueError as e:
            raise ConfigError(f"{path}: invalid configuration:\n  {e}") from None
        for key in overrides:
            if key in axes:
                raise ConfigError(
                    f"--set {key}: {path} sweeps {key} over {axes[key]}; override the axis "
                    f"instead (--set sweep.{key}=[...])"
                )
    raw = apply_overrides(raw, overrides)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        origin = f"{path} with overrides {', '.join(overrides)}" if overrides else str(path)
        raise ConfigError(f"{origin}: invalid configuration:\n{_format_errors(e)}") from None
