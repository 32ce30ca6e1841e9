"""Layer selection (patterns, types, auto) and schedules (every, listed, log-spaced)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from covshift.models import build_cnn, build_mlp
from covshift.nn import NoisyNorm
from covshift.probe import Schedule, ShiftProbe, select_layers


def test_auto_picks_norms_and_activations() -> None:
    net = build_mlp(10, 2, width=4, depth=2, norm="batch")
    sel = select_layers(net, "auto")
    assert list(sel.modules) == ["hidden.0.norm", "hidden.0.act", "hidden.1.norm", "hidden.1.act"]
    assert sel.optional == frozenset(sel.modules)
    assert list(select_layers(net, "auto:act").modules) == ["hidden.0.act", "hidden.1.act"]
    assert list(select_layers(net, "auto:linear").modules) == [
        "hidden.0.linear",
        "hidden.1.linear",
        "head",
    ]
    cnn = build_cnn((1, 8, 8), 3, channels=(4, 8), norm="group", norm_kwargs={"num_groups": 2})
    assert list(select_layers(cnn, "auto:norm").modules) == ["features.0.norm", "features.1.norm"]


def test_auto_keeps_the_outermost_norm() -> None:
    net = nn.Sequential(nn.Linear(3, 4), NoisyNorm(nn.BatchNorm1d(4)), nn.Tanh())
    assert list(select_layers(net, "auto").modules) == ["1", "2"]  # not "1.norm"


def test_types_and_patterns_combine() -> None:
    net = build_mlp(10, 2, width=4, depth=2)
    sel = select_layers(net, [nn.Sigmoid, "head"])
    assert list(sel.modules) == ["hidden.0.act", "hidden.1.act", "head"]
    assert "head" not in sel.optional  # named explicitly: must be called


SUBTREE = ["", ".0", ".1", ".2", ".2.0", ".2.1"]  # below each block


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
            for _ in range(2)
        )
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("blocks.*", ["blocks.0", "blocks.1"]),  # '*' stays within one part
        ("blocks.*.1", ["blocks.0.1", "blocks.1.1"]),
        ("blocks.**", [f"blocks.{b}{rest}" for b in "01" for rest in SUBTREE]),
        ("blocks.**.1", ["blocks.1", "blocks.0.1", "blocks.0.2.1", "blocks.1.1", "blocks.1.2.1"]),
        ("**.1", ["blocks.1", "blocks.0.1", "blocks.0.2.1", "blocks.1.1", "blocks.1.2.1"]),
        ("blocks.?.2.[01]", ["blocks.0.2.0", "blocks.0.2.1", "blocks.1.2.0", "blocks.1.2.1"]),
        ("blocks.[!0].0", ["blocks.1.0"]),
        ("he*", ["head"]),
    ],
)
def test_glob_star_stays_within_a_part_and_double_star_spans(
    pattern: str, expected: list[str]
) -> None:
    names = list(select_layers(_Nested(), pattern).modules)
    assert sorted(names) == sorted(expected)


def test_a_star_pattern_that_would_need_double_star_says_so() -> None:
    with pytest.raises(ValueError, match=r"'\*' stays within one dotted part; 'blocks.\*\*.1.0'"):
        select_layers(_Nested(), "blocks.*.1.0")


class NewGELUActivation(nn.Module):  # transformers' GPT-2 activation
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x**3)))


class QuickGELUActivation(nn.Module):  # transformers' CLIP activation
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class GELUTanh(nn.Module):  # timm's
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate="tanh")


class Swish(nn.Module):  # timm's
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class BatchNormAct2d(nn.BatchNorm2d):  # a norm with an activation inside: a norm
    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()


class GatedActivation(nn.Module):  # has children: a block, not an elementwise activation
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 4)


def test_auto_finds_the_activations_of_other_libraries_by_class_name() -> None:
    net = nn.Sequential(
        nn.Linear(4, 4),
        NewGELUActivation(),
        QuickGELUActivation(),
        GELUTanh(),
        Swish(),
        BatchNormAct2d(4),
        GatedActivation(),
    )
    assert list(select_layers(net, "auto:act").modules) == ["1", "2", "3", "4", "5.act"]
    assert list(select_layers(net, "auto").modules) == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize(
    ("layers", "error", "message"),
    [
        ("nothing.*", ValueError, "matches no module of MLP; module names of MLP look like"),
        (nn.Conv2d, ValueError, "layer type Conv2d matches no module of MLP; its module types"),
        ("auto:conv", ValueError, "unknown mode 'auto:conv'"),
        ("auto:norm", ValueError, "found no norm module in MLP"),
        ([], ValueError, "layers must name at least one module"),
        ([3], TypeError, "layers must be glob strings, nn.Module types"),
    ],
)
def test_selection_errors(layers: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        select_layers(build_mlp(10, 2, width=4, depth=1), layers)  # type: ignore[arg-type]


def test_explicit_layer_not_called_is_an_error_auto_is_skipped() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Tanh()
            self.spare = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    x = torch.randn(6, 3)
    records = ShiftProbe(Unused(), "auto", x).record_now(0)
    assert [r.layer for r in records] == ["used"]
    with pytest.raises(RuntimeError, match=r"layers \['spare'\] were not called"):
        ShiftProbe(Unused(), ["spare", "used"], x).record_now(0)


def test_logspace() -> None:
    assert sorted(Schedule.logspace(10_000, num=5).steps or ()) == [0, 1, 10, 100, 1000, 10_000]
    dense = Schedule.logspace(50_000, num=60)
    steps = sorted(dense.steps or ())
    assert steps[0] == 0 and steps[-1] == 50_000 and 40 <= len(steps) <= 61
    gaps = [b - a for a, b in itertools.pairwise(steps[1:])]
    assert gaps[0] == 1 and gaps[-1] > 1000  # dense early, sparse late
    assert sorted(Schedule.logspace(5, num=1, zero=False).steps or ()) == [5]
    assert dense.count(100) == sum(1 for s in steps if s <= 100)
    assert Schedule(every=10).count(35) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 2.5}, "positive number of steps"),
        ({"every": True}, "positive number of steps"),
        ({"every": -3}, "positive number of steps"),
        ({"steps": []}, "non-empty list of steps >= 0"),
        ({"steps": [1, 2.5]}, "non-empty list of steps >= 0"),
        ({"steps": "10"}, "non-empty list of steps >= 0"),
        ({"every": 2, "steps": [1]}, "exactly one of every=k or steps"),
    ],
)
def test_nonsense_schedules(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Schedule.logspace(0), "1 <= first <= last"),
        (lambda: Schedule.logspace(10, first=20), "1 <= first <= last"),
        (lambda: Schedule.logspace(10, num=0), "num must be a whole number >= 1"),
    ],
)
def test_nonsense_logspace(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


def test_probe_schedule_arguments() -> None:
    net = build_mlp(10, 2, width=4, depth=1)
    x = torch.randn(8, 10)
    probe = ShiftProbe(net, "auto", x, schedule=Schedule.logspace(100, num=3))
    assert [s for s in range(101) if probe.schedule.due(s)] == [0, 1, 10, 100]
    with pytest.raises(ValueError, match="only one of every=k, steps"):
        ShiftProbe(net, "auto", x, every=3, schedule=Schedule(every=2))
    with pytest.raises(ValueError, match="positive number of steps"):
        ShiftProbe(net, "auto", x, every=0)
