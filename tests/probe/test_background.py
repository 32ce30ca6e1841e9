"""Background recording: the same numbers as a synchronous record at the same step,
records delivered in order and never lost, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.models import build_cnn, build_mlp
from covshift.probe import ProbeRecord, ShiftProbe
from covshift.probe import probe as probe_module


def train_probed(
    net: nn.Module, x_probe: torch.Tensor, steps: int, **probe_kw: object
) -> list[ProbeRecord]:
    """A few SGD steps on fixed random data, recording every 3 steps."""
    opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    shape = x_probe.shape[1:]
    with ShiftProbe(net, probe_input=x_probe, every=3, **probe_kw) as probe:
        probe.maybe_record(0)
        for step in range(1, steps + 1):
            x = torch.randn(16, *shape, generator=gen)
            y = torch.randint(0, 10, (16,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            probe.maybe_record(step)
    return probe.records


def warmed(net: nn.Module) -> nn.Module:
    """``net`` after one training-mode forward, so that its BatchNorm's running
    statistics have seen a batch (records of untrained norms are never taken in the
    background: see covshift.probe.norm_stats)."""
    with torch.no_grad():
        net(torch.randn(16, 20, generator=torch.Generator().manual_seed(3)))
    return net


def assert_same_records(a: list[ProbeRecord], b: list[ProbeRecord]) -> None:
    assert [(r.step, r.layer, r.activation) for r in a] == [
        (r.step, r.layer, r.activation) for r in b
    ]
    for ra, rb in zip(a, b, strict=True):
        assert ra.stats.keys() == rb.stats.keys()
        for key in ra.stats:
            np.testing.assert_array_equal(ra.stats[key], rb.stats[key], err_msg=key)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_background_records_equal_synchronous_ones(kind: str) -> None:
    def build() -> nn.Module:
        if kind == "mlp":
            return build_mlp(20, 10, width=12, depth=2, norm="batch", seed=0)
        return build_cnn((1, 8, 8), 10, channels=(4, 6), norm="batch", seed=0)

    x = torch.randn(40, 20) if kind == "mlp" else torch.randn(40, 1, 8, 8)
    sync = train_probed(build(), x, 10, background=False)
    background = train_probed(build(), x, 10, background=True)
    assert sorted({r.step for r in sync}) == [0, 3, 6, 9]
    assert_same_records(background, sync)


def test_record_uses_the_weights_of_its_step_not_later_ones() -> None:
    net = warmed(build_mlp(20, 10, width=12, depth=1, norm="batch", seed=0))
    x = torch.randn(30, 20)
    reference = ShiftProbe(net, probe_input=x, background=False)
    expected = reference.record_now(5)
    probe = ShiftProbe(net, probe_input=x, every=5, background=True)
    probe.check()  # the first forward is synchronous
    probe.maybe_record(5)
    assert probe._background is not None and probe._background.busy
    with torch.no_grad():  # training goes on while the worker runs
        for p in net.parameters():
            p.mul_(-3.0)
    got = probe.flush()
    probe.close()
    assert_same_records(got, expected)


def test_records_arrive_in_step_order_and_none_is_lost_on_an_exception() -> None:
    net = warmed(build_mlp(20, 10, width=12, depth=1, norm="batch", seed=0))
    x = torch.randn(30, 20)
    with pytest.raises(KeyboardInterrupt):
        with ShiftProbe(net, probe_input=x, every=2, background=True) as probe:
            for step in range(0, 9):
                probe.maybe_record(step)
            assert probe._background is not None and probe._background.busy  # step 8
            raise KeyboardInterrupt
    steps = [r.step for r in probe.records]
    assert steps == sorted(steps)
    assert sorted(set(steps)) == [0, 2, 4, 6, 8]
    assert probe._background is None  # the worker is stopped


def test_finished_records_reach_the_sink_at_the_next_call() -> None:
    net = warmed(build_mlp(20, 10, width=12, depth=1, norm="batch", seed=0))
    probe = ShiftProbe(net, probe_input=torch.randn(30, 20), every=2, background=True)
    with probe:
        probe.maybe_record(0)  # synchronous
        probe.maybe_record(2)  # in flight
        assert {r.step for r in probe.records} == {0}
        assert probe._background is not None
        probe._background._in_flight[1].result()  # the worker finished
        probe.maybe_record(3)  # not due: delivers what is finished
        assert {r.step for r in probe.records} == {0, 2}
        probe.on_eval(None, {})  # nothing in flight: a no-op
    assert {r.step for r in probe.records} == {0, 2}


def test_eval_callback_flushes_before_a_checkpoint() -> None:
    net = warmed(build_mlp(20, 10, width=12, depth=1, norm="batch", seed=0))
    probe = ShiftProbe(net, probe_input=torch.randn(30, 20), every=2, background=True)
    probe.maybe_record(0)
    probe.maybe_record(2)
    probe.on_eval(None, {})
    assert {r.step for r in probe.records} == {0, 2}
    probe.close()


def test_snapshot_follows_a_changed_model() -> None:
    net = warmed(build_mlp(20, 10, width=12, depth=1, norm="batch", seed=0))
    x = torch.randn(30, 20)
    probe = ShiftProbe(net, "hidden.*.act", probe_input=x, every=1, background=True)
    probe.maybe_record(0)
    probe.maybe_record(1)
    first = probe._background.snapshot if probe._background else None
    net.hidden[0].norm = nn.LayerNorm(12)  # a different module tree
    probe.maybe_record(2)
    probe.close()
    assert first is not None
    reference = ShiftProbe(net, "hidden.*.act", probe_input=x, background=False)
    assert_same_records([r for r in probe.records if r.step == 2], reference.record_now(2))


def test_auto_mode_needs_a_spare_core_a_cpu_model_and_no_foreign_hooks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = warmed(build_mlp(20, 10, width=12, depth=1, norm="batch", seed=0))
    probe = ShiftProbe(net, probe_input=torch.randn(30, 20))
    assert not probe._use_background()  # no synchronous record yet
    probe.check()
    monkeypatch.setattr(probe_module.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(probe_module.torch, "get_num_threads", lambda: 3)
    assert probe._use_background()
    monkeypatch.setattr(probe_module.torch, "get_num_threads", lambda: 4)
    assert not probe._use_background()  # torch's threads spin on every core
    monkeypatch.setattr(probe_module.torch, "get_num_threads", lambda: 1)
    handle = net.hidden[0].act.register_forward_hook(lambda *a: None)
    assert not probe._use_background()  # someone else's hook must run in every forward
    handle.remove()
    assert probe._use_background()
    off = ShiftProbe(net, probe_input=torch.randn(30, 20), background=False)
    off.check()
    assert not off._use_background()


def test_the_worker_runs_torch_on_one_thread_and_leaves_the_caller_alone() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        net = warmed(build_mlp(20, 10, width=12, depth=1, norm="batch", seed=0))
        probe = ShiftProbe(net, probe_input=torch.randn(30, 20), every=1, background=True)
        probe.maybe_record(0)
        probe.maybe_record(1)  # starts the worker
        assert probe._background is not None and probe._background._executor is not None
        seen = probe._background._executor.submit(torch.get_num_threads).result()
        probe.close()
        assert seen == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_an_uncopyable_model_falls_back_to_synchronous_records() -> None:
    class Uncopyable(nn.Sequential):
        def __deepcopy__(self, memo: dict) -> None:
            raise TypeError("cannot copy this model")

    x = torch.randn(30, 20)
    net = Uncopyable(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 2))
    probe = ShiftProbe(net, probe_input=x, every=1, background=None)
    probe.check()
    probe._background_mode = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probe_module.torch, "get_num_threads", lambda: 1)
        mp.setattr(probe_module.os, "cpu_count", lambda: 2)
        probe.maybe_record(0)
        probe.maybe_record(1)
    assert [r.step for r in probe.records if r.layer == "1"] == [0, 1]
    assert probe._background_mode is False
    explicit = ShiftProbe(net, probe_input=x, every=1, background=True)
    explicit.maybe_record(0)
    with pytest.raises(RuntimeError, match=r"deepcopy of the model.*background=False"):
        explicit.maybe_record(1)
    explicit.close(flush=False)


def test_a_failing_background_forward_raises_at_the_next_call() -> None:
    class FailsLater(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(20, 4)
            self.act = nn.Sigmoid()
            self.calls = nn.Buffer(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.calls.item() > 0 and not self.training:
                raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
            return self.act(self.linear(x))

    net = FailsLater()
    probe = ShiftProbe(net, probe_input=torch.randn(30, 20), every=1, background=True)
    probe.maybe_record(0)
    net.calls.fill_(1.0)  # from now on every eval forward fails
    probe.maybe_record(1)
    with pytest.raises(RuntimeError, match=r"probe: the model's forward failed on the probe batch"):
        probe.flush()
    probe.close()


def test_background_is_refused_where_it_cannot_work() -> None:
    net = build_mlp(20, 10, width=12, depth=1, seed=0)
    with pytest.raises(ValueError, match="source='train'"):
        ShiftProbe(net, source="train", background=True)
    probe = ShiftProbe(net, probe_input=torch.randn(30, 20), background=True, reduce=True)
    probe._checked = True
    with pytest.raises(RuntimeError, match="cannot reduce statistics across ranks"):
        probe._use_background()
