"""The experiment configuration schema (pydantic); :mod:`.config_files` reads it from
TOML presets and ``--set`` overrides.

An experiment trains several *networks* that share one model spec and differ only in
the fields each network overrides (e.g. ``norm``), over a grid: the product of the
networks, the sweep axes (:mod:`covshift.experiments.axes`) and the seeds. Points
that share a seed share the batches and, where the shapes allow, the initial weights,
so differences between networks pair by seed. Every field is validated; unknown
fields are errors, so a typo in a preset or in ``--set`` is caught with the field's
path in the message, before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import (
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from covshift.experiments.axes import closest, flatten_sweep, set_dotted
from covshift.experiments.claim_spec import ClaimSpec
from covshift.experiments.config_errors import first_error
from covshift.experiments.config_sections import (
    MAX_DEPTH,
    MAX_SEED,
    MAX_SEED_COUNT,
    BatterySpec,
    ConfigError,
    DivergenceSpec,
    ModelSpec,
    NetworkSpec,
    OptimizerSpec,
    ProbeSpec,
    ReportSpec,
    SizeSpec,
    Strict,
)
from covshift.experiments.metric_paths import TRAIN_MODE, parse_metric

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
]

_DEFAULT_STEPS = 50_000
_DEFAULT_EVAL_EVERY = 500


# ``where = { axis = "largest" }``: the end of a numeric axis, whatever values a size
# gives it (one claim serves every size of a preset).
_AXIS_ENDS = {"largest": max, "smallest": min}


def _axis_ends(claim: Any, sweep: dict[str, Any], record: bool = True) -> Any:
    """A claim or the battery table (as read) with ``where`` / ``baseline_where``
    values ``"largest"`` and ``"smallest"`` replaced by that end of their numeric axis;
    anything else as given (a key that is not an axis is reported by its own check).
    With ``record``, what was resolved goes to the claim's ``axis_ends``."""
    if not isinstance(claim, dict):
        return claim
    claim = dict(claim)
    ends = dict(claim.get("axis_ends") or {})
    for field in ("where", "baseline_where"):
        table = claim.get(field)
        if not isinstance(table, dict):
            continue
        resolved = {}
        for key, value in table.items():
            values = sweep.get(key)
            if isinstance(value, str) and value in _AXIS_ENDS and values:
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    raise ValueError(
                        f"{field}.{key} = {value!r} needs a numeric axis; {key} has {list(values)}"
                    )
                ends[f"{field}.{key}"] = value
                value = _AXIS_ENDS[value](values)
            resolved[key] = value
        claim[field] = resolved
    if record and ends:
        claim["axis_ends"] = ends
    return claim


class ExperimentConfig(Strict):
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
            data["sweep"] = flatten_sweep(data["sweep"], SWEEPABLE)
        sweep = data.get("sweep") or {}
        if "claims" in data and isinstance(data["claims"], (list, tuple)):
            data["claims"] = [_axis_ends(c, sweep) for c in data["claims"]]
        if isinstance(data.get("battery"), dict):
            data["battery"] = _axis_ends(data["battery"], sweep, record=False)
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
                raise ValueError(f"networks.{key}: {first_error(e, NetworkSpec)}") from None
        self._check_text_model()
        self._check_axes()
        ids = [c.id for c in self.claims if c.id is not None]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"claims: the ids {repeated} are given to more than one claim")
        for i, claim in enumerate(self.claims):
            self._check_claim(i, claim)
        self._check_controls()
        self._check_battery_where()
        return self

    def _check_battery_where(self) -> None:
        if self.battery is not None:
            self._check_on_axes("battery.where", self.battery.where.items())

    def _check_on_axes(self, label: str, pairs: Iterable[tuple[str, Any]]) -> None:
        """Each ``(axis, value)`` names a sweep axis and one of its values."""
        axes = list(self.sweep)
        for key, value in pairs:
            if key not in self.sweep:
                raise ValueError(
                    f"{label}: {key!r} is not a sweep axis{closest(key, axes)}; "
                    f"axes: {', '.join(axes) or 'none'}"
                )
            if value not in self.sweep[key]:
                raise ValueError(
                    f"{label}: {key} = {value!r} is not on the axis {list(self.sweep[key])}"
                )

    def _check_controls(self) -> None:
        """Every control a hypothesis names is a check of this experiment (or, written
        ``<preset>:<id>``, of another battery preset: checked by the battery's plan)."""
        checks = [c.id for c in self.claims if c.kind == "check" and c.id is not None]
        known = ", ".join(checks) or 'none (a check is a claim with kind = "check" and an id)'
        for i, claim in enumerate(self.claims):
            for control in claim.controls:
                if ":" in control:  # <preset>:<check id>, checked where presets meet
                    continue
                if control not in checks:
                    raise ValueError(
                        f"claims[{i}].controls: {control!r} is not the id of a check of this "
                        f"experiment{closest(control, checks)}; checks: {known}"
                    )

    def _check_text_model(self) -> None:
        """A transformer trains on text (a sequence dataset), and text needs one."""
        from covshift.data import dataset_names, is_sequence_dataset

        text = is_sequence_dataset(self.dataset)
        for key, net in self.networks.items():
            kind = net.resolve(self.model).kind
            where = "model.kind" if net.kind is None else f"networks.{key}.kind"
            if kind == "transformer" and not text:
                texts = [n for n in dataset_names() if is_sequence_dataset(n)]
                raise ValueError(
                    f"{where} = 'transformer' trains on text, and dataset {self.dataset!r} is "
                    f"not text; use one of {', '.join(texts)}"
                )
            if text and kind != "transformer":
                raise ValueError(
                    f"dataset {self.dataset!r} is text (byte sequences): {where} must be "
                    f"'transformer', got {kind!r}"
                )

    def _check_axes(self) -> None:
        """Each axis value, applied alone to this configuration, must validate, and no
        network may override a swept model field (it would silently win)."""
        if not self.sweep:
            return
        # (claims and the battery's where name axes: checked apart)
        base = self.model_dump(exclude={"sweep", "claims", "battery"})
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
                    raise ValueError(
                        f"sweep.{key}[{i}] = {value!r}: {first_error(e, ExperimentConfig)}"
                    ) from None

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
        self._check_on_axes(f"{where}.where", [*claim.where.items(), *claim.baseline_where.items()])
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


SWEEPABLE: dict[str, list[str]] = {
    "model": list(ModelSpec.model_fields),
    "optimizer": list(OptimizerSpec.model_fields),
    "probe": list(ProbeSpec.model_fields),
    "divergence": list(DivergenceSpec.model_fields),
}
