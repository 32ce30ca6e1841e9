"""The batched loop against one-at-a-time runs: K members trained together record what
each records alone (scalars, probe records in both modes, noise floor, gradient ICS,
smoothness, end status) within a stated float tolerance; a member that diverges or
fails leaves the others' numbers bitwise as they were; a batch interrupted and resumed
from its members' checkpoints ends with the numbers of an uninterrupted batch, and the
optimizer steps each member exactly as torch's SGD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from covshift.batched.optim import MemberSGD, SGDSettings
from covshift.checkpoints import CheckpointWarning, FileCheckpointer
from covshift.data import load_dataset
from covshift.experiments import load_config
from covshift.experiments.grid import Point, expand_grid
from covshift.experiments.point import train_point
from covshift.experiments.point_members import train_point_members

# The stated tolerance of a member against its one-at-a-time run (float32 rounding of a
# batched matmul or grouped conv against a single one, carried through training): on
# these configs every scalar and probe statistic agrees to 1e-4 relative (of the
# record's scale), accuracies to within one test example in 300, and histogram counts
# to within the few values that sit on a bin edge (at most 2 values, or 1e-4 of those
# counted, change bin: a CNN layer's histogram counts 156,800).
RTOL = 1e-4
COUNTS = {"hist", "unit_hist"}

CONFIG = """
name = "members"
title = "members"
dataset = "synthetic"
seeds = [0, 1]
steps = 40
batch_size = 20
eval_every = 20
[model]
width = 16
depth = 2
norm = "{norm}"
[probe]
every = 20
examples = 50
mode = "both"
noise_floor = true
gradient_ics_every = 20
smoothness_every = 20
measure_batch = 16
[sweep]
optimizer.lr = [0.05, 0.2]
optimizer.momentum = [0.0, 0.9]
"""


class Sink:
    """Every row a point writes, in order."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.rows.append(("scalars", step, dict(values)))

    def probe(self, record) -> None:
        self.rows.append(("probe", record.step, record.layer, dict(record.stats)))

    def end(self, status: str, error: str | None = None, diverged_at: int | None = None) -> None:
        self.rows.append(("end", status, error is None, diverged_at))


def _bits(sink: Sink) -> list[tuple]:
    """The rows with every array as (dtype, shape, bytes): for bitwise comparisons."""
    out = []
    for row in sink.rows:
        if row[0] == "probe":
            stats = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in row[3].items()}
            row = (*row[:3], stats)
        out.append(row)
    return out


def _points(tmp_path: Path, norm: str = "batch", text: str = CONFIG) -> list[Point]:
    path = tmp_path / "c.toml"
    path.write_text(text.replace("{norm}", norm))
    return expand_grid(load_config(str(path)))


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_train=600, n_test=300, seed=1)


def _alone(points: list[Point], data) -> list[Sink]:
    sinks = []
    for point in points:
        sink = Sink()
        train_point(point.spec, data, sink)
        sinks.append(sink)
    return sinks


def _together(points: list[Point], data, **kw) -> list[Sink]:
    sinks = [Sink() for _ in points]
    kw.setdefault("checkpoints", [None] * len(points))
    train_point_members([p.spec for p in points], data, sinks, **kw)
    return sinks


def _assert_close(a: Sink, b: Sink) -> None:
    assert a.rows[-1][:2] != ("end", "failed"), a.rows[-1]  # (two failures would agree)
    assert [r[:2] for r in a.rows] == [r[:2] for r in b.rows]
    for ra, rb in zip(a.rows, b.rows, strict=True):
        if ra[0] == "end":
            assert ra == rb
        elif ra[0] == "scalars":
            assert ra[2].keys() == rb[2].keys()
            for key, value in ra[2].items():
                tol = 1 / 300 + 1e-9 if key == "test_accuracy" else RTOL * max(1.0, abs(value))
                assert abs(value - rb[2][key]) <= tol, (ra[1], key, value, rb[2][key])
        else:
            assert ra[2] == rb[2]
            for stat, value in ra[3].items():
                x, y = np.asarray(value, float), np.asarray(rb[3][stat], float)
                if stat in COUNTS:  # a value on a bin edge may land in the next bin
                    moved = np.abs(x - y).sum() / 2  # a moved value leaves a bin, enters one
                    assert x.sum() == y.sum() and moved <= max(2, RTOL * x.sum()), (ra[1:3], stat)
                    continue
                scale = max(1.0, float(np.nanmax(np.abs(x)))) if x.size else 1.0
                np.testing.assert_allclose(
                    y, x, rtol=0, atol=RTOL * scale, err_msg=f"{ra[1:3]} {stat}"
                )


@pytest.mark.parametrize("norm", ["batch", "batch_noisy", "none"])
def test_members_record_what_they_record_alone(tmp_path: Path, data, norm: str) -> None:
    """8 points (2 seeds x 2 rates x 2 momenta) trained as one batch: every row of
    every point within the tolerance of its one-at-a-time run, probes in eval and
    train mode, the noise floor, gradient ICS and smoothness included."""
    points = _points(tmp_path, norm)
    alone = _alone(points, data)
    together = _together(points, data)
    for a, b in zip(alone, together, strict=True):
        assert a.rows[-1] == ("end", "finished", True, None)
        _assert_close(a, b)


def test_members_with_a_cosine_decay_record_what_they_record_alone(tmp_path: Path, data) -> None:
    # the batch's step takes each member's rate at that step (MemberSGD.step(lr_at)),
    # as torch's SGD is given it in the member's one-at-a-time run, and a member's own
    # SGD holds that rate when a record reads it (gradient ICS, smoothness). 50 steps:
    # the smoothness record of step 40 then steps at 0.11 x lr (at the last step of a
    # cosine, 0.0015 x lr, its differences of losses are rounding, batched or not)
    text = CONFIG.replace("[model]", '[optimizer]\ndecay = "cosine"\n[model]')
    text = text.replace("steps = 40", "steps = 50")
    points = _points(tmp_path, "batch", text)
    assert {p.spec.optimizer.decay for p in points} == {"cosine"}
    together = _together(points, data)
    for a, b in zip(_alone(points, data), together, strict=True):
        assert a.rows[-1] == ("end", "finished", True, None)
        _assert_close(a, b)
    constant = _together(_points(tmp_path, "batch"), data)
    last = [r for r in together[0].rows if r[0] == "scalars"][-1]
    flat = [r for r in constant[0].rows if r[0] == "scalars"][-1]
    assert abs(last[2]["train_loss"] - flat[2]["train_loss"]) > 1e-3  # decay applied


def test_frozen_layers_and_weight_decay_per_member(tmp_path: Path, data) -> None:
    text = CONFIG.replace(
        "[sweep]",
        "[optimizer]\nweight_decay = 0.01\n[networks.all]\nlabel = 'all'\n"
        "[networks.frozen]\nlabel = 'frozen'\nfreeze = ['hidden.0']\n[sweep]",
    ).replace('mode = "both"', 'mode = "eval"')
    points = _points(tmp_path, "none", text)
    assert {p.network for p in points} == {"all", "frozen"}
    alone = _alone(points, data)
    together = _together(points, data)
    for a, b in zip(alone, together, strict=True):
        _assert_close(a, b)


CNN_CONFIG = CONFIG.replace("width = 16\ndepth = 2", 'kind = "cnn"\nchannels = [4, 8]').replace(
    "[probe]\n", '[probe]\nlayers = ["features.*.act"]\n'
)


def test_cnn_members_record_what_they_record_alone(tmp_path: Path, data) -> None:
    points = _points(tmp_path, "batch", CNN_CONFIG)[:4]
    for a, b in zip(_alone(points, data), _together(points, data), strict=True):
        assert a.rows[-1] == ("end", "finished", True, None)  # trained, probed, evaluated
        assert sum(r[0] == "probe" for r in a.rows) > 0
        _assert_close(a, b)


def test_cnn_members_evaluate_as_their_one_at_a_time_run_does(tmp_path: Path, data) -> None:
    # Convolutional members evaluate one at a time, each its own network: at step 0,
    # where every member's weights are its one-at-a-time init, the evaluation is the
    # one-at-a-time run's to the bit (one grouped conv of K groups rounds otherwise).
    points = _points(tmp_path, "batch", CNN_CONFIG)[:4]
    for a, b in zip(_alone(points, data), _together(points, data), strict=True):
        assert a.rows[-1] == ("end", "finished", True, None)
        first_a = next(r for r in a.rows if r[0] == "scalars" and r[1] == 0)
        first_b = next(r for r in b.rows if r[0] == "scalars" and r[1] == 0)
        assert first_a == first_b


def test_a_diverging_member_leaves_the_others_bitwise_unchanged(tmp_path: Path, data) -> None:
    points = _points(tmp_path, "none")[:3]
    calm = _together(points, data)
    wild_spec = points[1].spec.model_copy(
        update={"optimizer": points[1].spec.optimizer.model_copy(update={"lr": 1e4})}
    )
    wild = Point(points[1].id, 1, "x", "x", 0, {}, wild_spec)
    stormy = _together([points[0], wild, points[2]], data)
    assert stormy[1].rows[-1][:2] == ("end", "diverged")
    assert stormy[1].rows[-1][3] == 20  # at its first evaluation after step 0
    assert _bits(stormy[0]) == _bits(calm[0])
    assert _bits(stormy[2]) == _bits(calm[2])


class _Boom:
    def on_step_end(self, state) -> None:
        if state.step == 25:
            raise RuntimeError("this member's callback broke")


def test_a_failing_member_fails_alone(tmp_path: Path, data) -> None:
    points = _points(tmp_path, "batch")[:3]
    calm = _together(points, data)
    sinks = [Sink() for _ in points]
    outcomes = train_point_members(
        [p.spec for p in points],
        data,
        sinks,
        checkpoints=[None] * 3,
        callbacks=[(), (_Boom(),), ()],
    )
    assert [o.status for o in outcomes] == ["finished", "failed", "finished"]
    assert "this member's callback broke" in (outcomes[1].error or "")
    assert sinks[1].rows[-1] == ("end", "failed", False, None)
    assert _bits(sinks[0]) == _bits(calm[0]) and _bits(sinks[2]) == _bits(calm[2])


class _Interrupt:
    def on_step_end(self, state) -> None:
        if state.step == 30:
            raise KeyboardInterrupt


def test_an_interrupted_batch_resumes_to_the_same_numbers(tmp_path: Path, data) -> None:
    points = _points(tmp_path, "batch_noisy")
    reference = _together(points, data)
    keepers = [FileCheckpointer(tmp_path / f"{i}.pt", owner=f"run-{i}") for i in range(8)]
    first = [Sink() for _ in points]
    with pytest.raises(KeyboardInterrupt):
        train_point_members(
            [p.spec for p in points],
            data,
            first,
            checkpoints=keepers,
            callbacks=[(_Interrupt(),)] + [()] * 7,
        )
    assert all(s.rows[-1] == ("end", "interrupted", True, None) for s in first)
    assert all(k.path.exists() for k in keepers)  # saved at step 20
    payload = torch.load(keepers[3].path, weights_only=False)
    assert payload["step"] == 20 and payload["batch"] == [p.id for p in points]
    second = [Sink() for _ in points]
    outcomes = train_point_members([p.spec for p in points], data, second, checkpoints=keepers)
    assert {o.status for o in outcomes} == {"finished"}
    assert not any(k.path.exists() for k in keepers)
    for ref, a, b in zip(reference, first, second, strict=True):
        # What the store keeps: one row per key (a resumed run rewrites the rows after
        # its checkpoint, and the checkpoint's own step, with the same numbers).
        def keyed(sink: Sink, last: int | None = None) -> dict:
            rows = [r for r in _bits(sink) if r[0] != "end" and (last is None or r[1] <= last)]
            return {(r[0], r[1], r[2] if r[0] == "probe" else None): r for r in rows}

        assert {**keyed(a, 20), **keyed(b)} == keyed(ref)
        assert b.rows[-1] == ref.rows[-1]


def test_a_batched_checkpoint_resumes_one_at_a_time(tmp_path: Path, data) -> None:
    """The members' checkpoints are the one-at-a-time format: train_point resumes one."""
    points = _points(tmp_path, "batch")[:2]
    keepers = [FileCheckpointer(tmp_path / f"{i}.pt") for i in range(2)]
    with pytest.raises(KeyboardInterrupt):
        train_point_members(
            [p.spec for p in points],
            data,
            [Sink(), Sink()],
            checkpoints=keepers,
            callbacks=[(_Interrupt(),), ()],
        )
    sink = Sink()
    outcome = train_point(points[0].spec, data, sink, checkpoint=keepers[0])
    assert outcome.status == "finished" and outcome.final_step == 40
    # Resumed at step 20: its probe records from there, its next evaluation at 40.
    assert sink.rows[0][:2] == ("probe", 20)
    assert [r[1] for r in sink.rows if r[0] == "scalars"] == [40]


def test_member_sgd_is_torch_sgd_for_each_member() -> None:
    torch.manual_seed(0)
    settings = [
        SGDSettings(0.1),
        SGDSettings(0.1, 0.9, 0.01),
        SGDSettings(0.5, 0.9),
        SGDSettings(0.3),
    ]
    trainable = [[True, False, True, True], [True, True, True, True]]
    weight = torch.nn.Parameter(torch.randn(4, 3, 5))
    bias = torch.nn.Parameter(torch.randn(4, 3))
    sgd = MemberSGD([weight, bias], settings, trainable)
    singles = [
        (
            torch.nn.Parameter(weight[k].detach().clone()),
            torch.nn.Parameter(bias[k].detach().clone()),
        )
        for k in range(4)
    ]
    opts = []
    for k, (w, b) in enumerate(singles):
        if not trainable[0][k]:
            w.requires_grad_(False)
        s = settings[k]
        opts.append(
            torch.optim.SGD([w, b], lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        )
    for _ in range(3):
        gw, gb = torch.randn(4, 3, 5), torch.randn(4, 3)
        weight.grad, bias.grad = gw.clone(), gb.clone()
        sgd.step()
        for k, ((w, b), opt) in enumerate(zip(singles, opts, strict=True)):
            w.grad = gw[k].clone() if w.requires_grad else None
            b.grad = gb[k].clone()
            opt.step()
            assert torch.equal(weight[k], w) and torch.equal(bias[k], b)
    sgd.drop(2)
    before = weight[2].detach().clone()
    weight.grad = torch.randn(4, 3, 5)
    sgd.step()
    assert torch.equal(weight[2], before)


class _InterruptAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state) -> None:
        if state.step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("norm", "config"),
    [("batch", CONFIG), ("none", CONFIG), ("batch", CNN_CONFIG)],
    ids=["mlp-bn", "mlp", "cnn-bn"],
)
def test_members_resuming_from_different_steps(
    tmp_path: Path, data, norm: str, config: str
) -> None:
    """A killed batch whose members were saved at different evaluations (a crash while
    their checkpoints were written, or a damaged checkpoint that restarts its member)
    resumes as batches of those at one step, with the numbers of an uninterrupted batch,
    bitwise: a member left alone at its step trains beside a companion (a copy of
    itself, recorded nowhere), since alone in a batch of one a grouped convolution or a
    BatchNorm over one member's channels rounds otherwise."""
    text = config.replace("steps = 40", "steps = 80")
    points = _points(tmp_path, norm, text)[:3]
    specs = [p.spec for p in points]
    reference = _together(points, data)
    keepers = [FileCheckpointer(tmp_path / f"{i}.pt") for i in range(3)]
    with pytest.raises(KeyboardInterrupt):  # all three saved at step 20
        train_point_members(
            specs, data, [Sink()] * 3, checkpoints=keepers, callbacks=[(_InterruptAt(30),), (), ()]
        )
    for suffix in ("", ".sha256"):  # the second's state at 20, to keep the first company
        spare = tmp_path / f"spare.pt{suffix}"
        spare.write_bytes((tmp_path / f"1.pt{suffix}").read_bytes())
    with pytest.raises(KeyboardInterrupt):  # the first, on to its save at 40
        train_point_members(
            specs[:2],
            data,
            [Sink()] * 2,
            checkpoints=[keepers[0], FileCheckpointer(tmp_path / "spare.pt")],
            callbacks=[(_InterruptAt(50),), ()],
        )
    assert [torch.load(k.path, weights_only=False)["step"] for k in keepers] == [40, 20, 20]
    sinks = [Sink() for _ in points]
    outcomes = train_point_members(specs, data, sinks, checkpoints=keepers)
    assert {o.status for o in outcomes} == {"finished"}
    for ref, sink, start in zip(reference, sinks, (40, 20, 20), strict=True):
        tail = [r for r in _bits(ref) if r[0] == "end" or r[1] > start]
        assert [r for r in _bits(sink) if r[0] == "end" or r[1] > start] == tail


def test_a_member_restarted_from_a_damaged_checkpoint_keeps_its_batchs_numbers(
    tmp_path: Path, data
) -> None:
    """Two CNN members saved at step 20; the second's checkpoint is damaged (set aside,
    it starts over): each trains alone at its own step beside a companion, and both
    record, bitwise, what their uninterrupted batch recorded."""
    points = _points(tmp_path, "batch", CNN_CONFIG.replace("steps = 40", "steps = 60"))[:2]
    specs = [p.spec for p in points]
    reference = _together(points, data)
    keepers = [FileCheckpointer(tmp_path / f"{i}.pt") for i in range(2)]
    with pytest.raises(KeyboardInterrupt):
        train_point_members(
            specs, data, [Sink()] * 2, checkpoints=keepers, callbacks=[(_InterruptAt(30),), ()]
        )
    damaged = tmp_path / "1.pt"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    sinks = [Sink() for _ in points]
    with pytest.warns(CheckpointWarning, match="1.pt"):
        outcomes = train_point_members(specs, data, sinks, checkpoints=keepers)
    assert {o.status for o in outcomes} == {"finished"}
    assert [r for r in _bits(sinks[0]) if r[0] == "end" or r[1] > 20] == [
        r for r in _bits(reference[0]) if r[0] == "end" or r[1] > 20
    ]
    assert _bits(sinks[1]) == _bits(reference[1])


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_a_member_trains_to_the_same_bits_in_any_batch_of_two_or_more(
    tmp_path: Path, data, kind: str
) -> None:
    # What lets the planner choose batch sizes from timings: in a batch of two or more
    # a member's rows do not depend on which points share it, nor how many. (Alone in
    # a batch of one, a grouped convolution of one group or a BatchNorm over one
    # member's channels take other code paths: the planner leaves no point alone.)
    text = CNN_CONFIG if kind == "cnn" else CONFIG
    points = _points(tmp_path, "batch", text)[:4]
    first, *others = points
    runs = [
        _together([first, others[0]], data),
        _together([first, others[1]], data),
        _together([first, *others], data),
    ]
    reference = _bits(runs[0][0])
    assert runs[0][0].rows[-1] == ("end", "finished", True, None)
    for sinks in runs[1:]:
        assert _bits(sinks[0]) == reference
