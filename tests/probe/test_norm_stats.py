"""An eval-mode record of a network whose norms have seen no batch yet is what the
network computes: each such norm normalizes the probe batch with its own statistics,
and nothing of the model, its buffers or the random state changes.

References are independent: a deep copy of the model run in training mode (noise
layers switched off by hand), its values captured by plain hooks and summarized with
numpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.models import build_cnn, build_mlp
from covshift.nn import TimeVaryingNoise
from covshift.probe import ShiftProbe
from covshift.probe import norm_stats as norm_stats_module
from covshift.probe.norm_stats import keeps_running_statistics, untrained_norms

LEVELS = (0.15, 0.5, 0.85)


def captured(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    """The inputs of the named modules in one forward of ``model`` as it is, ``(M, U)``."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return {
        n: np.moveaxis(v.double().numpy(), 1, -1).reshape(-1, v.shape[1]) for n, v in seen.items()
    }


def training_forward(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    """What a training forward of a copy computes (batch statistics), noise off."""
    ref = copy.deepcopy(model).train()
    for m in ref.modules():
        if isinstance(m, TimeVaryingNoise):
            m.eval()
    return captured(ref, x, names)


def eval_forward(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    return captured(copy.deepcopy(model).eval(), x, names)


def assert_describes(stats: dict[str, np.ndarray], values: np.ndarray) -> None:
    np.testing.assert_allclose(stats["mean"], values.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["std"], values.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        stats["quantiles"], np.quantile(values, LEVELS, axis=0), rtol=1e-5, atol=1e-6
    )


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def torch_bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(12, 8),
        nn.BatchNorm1d(8),
        nn.Sigmoid(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 3.0)
    return net


NETWORKS = {
    "covshift-batch": lambda: build_mlp(12, 3, width=8, depth=3, norm="batch", init_std=3.0),
    "batch_renorm": lambda: build_mlp(12, 3, width=8, depth=3, norm="batch_renorm", init_std=3.0),
    "ghost_batch": lambda: build_mlp(
        12,
        3,
        width=8,
        depth=3,
        norm="ghost_batch",
        init_std=3.0,
        norm_kwargs={"virtual_batch_size": 16},
    ),
    "batch_noisy": lambda: build_mlp(12, 3, width=8, depth=3, norm="batch_noisy", init_std=3.0),
    "torch-BatchNorm1d": torch_bn_mlp,
}


def act_layers(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Sigmoid, nn.Tanh))]


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_step_zero_record_is_the_training_forward_and_changes_nothing(kind: str) -> None:
    net = NETWORKS[kind]()
    names = act_layers(net)
    norms = [m for m in net.modules() if keeps_running_statistics(m)]
    assert len(norms) in (2, 3) and untrained_norms(net) == norms
    x = torch.rand(64, 12) * 4 - 2
    expected = training_forward(net, x, names)
    running = eval_forward(net, x, names)  # through mean 0, variance 1: not what it computes
    before, rng = state(net), torch.get_rng_state()
    net.train()
    records = ShiftProbe(net, names, x, background=False).record_now(0)
    assert torch.equal(rng, torch.get_rng_state())  # nothing drawn, noise layers included
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # buffers
    assert net.training and all(m.training for m in net.modules())  # modes as they were
    assert [r.layer for r in records] == names
    for r in records:
        assert_describes(r.stats, expected[r.layer])
        assert int(r.stats["norm_batch_stats"]) == len(norms)
        assert not np.allclose(r.stats["quantiles"], np.quantile(running[r.layer], LEVELS, 0))


@pytest.mark.parametrize("kind", ["covshift-batch", "torch-BatchNorm1d"])
def test_once_a_batch_was_seen_records_use_the_running_statistics(kind: str) -> None:
    net = NETWORKS[kind]()
    names = act_layers(net)
    x = torch.rand(64, 12)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    F.cross_entropy(net(torch.rand(32, 12)), torch.randint(0, 3, (32,))).backward()
    opt.step()
    assert untrained_norms(net) == []
    expected = eval_forward(net, x, names)
    for r in ShiftProbe(net, names, x, background=False).record_now(1):
        assert_describes(r.stats, expected[r.layer])
        assert "norm_batch_stats" not in r.stats


def test_statistics_loaded_without_a_counter_are_used() -> None:
    # An old checkpoint without num_batches_tracked loads with the counter at 0, but
    # holds real statistics: the record goes through them.
    net = NETWORKS["torch-BatchNorm1d"]()
    with torch.no_grad():
        net[1].running_mean.fill_(0.5)
        net[4].running_var.fill_(2.0)
    assert int(net[1].num_batches_tracked) == 0
    assert untrained_norms(net) == []
    names = act_layers(net)
    x = torch.rand(64, 12)
    expected = eval_forward(net, x, names)
    for r in ShiftProbe(net, names, x, background=False).record_now(0):
        assert_describes(r.stats, expected[r.layer])


def test_a_cnn_with_torch_batchnorm2d() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3))
    x = torch.randn(6, 2, 7, 7) * 3 + 1
    expected = training_forward(net, x, ["2"])
    before = state(net)
    (record,) = ShiftProbe(net, ["2"], x).record_now(0)
    assert_describes(record.stats, expected["2"])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_module_frozen_in_eval_mode_stays_frozen() -> None:
    net = NETWORKS["torch-BatchNorm1d"]()
    net.train()
    net[4].eval()  # the user froze this norm
    ShiftProbe(net, ["2"], torch.rand(16, 12)).record_now(0)
    assert net.training and net[1].training and not net[4].training


def test_training_goes_on_bitwise_as_without_the_records() -> None:
    def run(probed: bool) -> dict[str, torch.Tensor]:
        net = build_mlp(12, 3, width=8, depth=2, norm="batch_noisy", init_std=3.0, seed=0)
        torch.manual_seed(5)  # noisy BN draws from the global generator in training
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        probe = ShiftProbe(net, act_layers(net), torch.rand(40, 12), every=2, background=True)
        for step in range(6):
            if probed:
                probe.maybe_record(step)
            x, y = torch.rand(16, 12, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        probe.close()
        if probed:
            assert int(probe.records[0].stats["norm_batch_stats"]) == 2  # step 0
            assert all("norm_batch_stats" not in r.stats for r in probe.records[2:])
        return state(net)

    with_records, without = run(True), run(False)
    assert all(torch.equal(with_records[k], v) for k, v in without.items())


def test_untrained_norms_are_never_recorded_in_the_background() -> None:
    net = NETWORKS["covshift-batch"]()
    names = act_layers(net)
    x = torch.rand(32, 12)
    expected = training_forward(net, x, names)
    with ShiftProbe(net, names, x, every=1, background=True) as probe:
        probe.maybe_record(0)
        probe.maybe_record(1)  # still no training batch: on this thread, batch statistics
        assert probe._background is None
    assert [r.step for r in probe.records] == [0, 0, 0, 1, 1, 1]
    for r in probe.records:
        assert_describes(r.stats, expected[r.layer])


def test_sync_batchnorm_alone_is_batchnorm_and_records_of_one_rank_run_no_collective(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = build_cnn((1, 6, 6), 3, channels=(4,), norm="sync_batch", seed=0)
    x = torch.randn(10, 36) * 2 + 1
    layer = "features.0.act"
    expected = training_forward(net, x, [layer])
    (record,) = ShiftProbe(net, [layer], x).record_now(0)
    assert_describes(record.stats, expected[layer])
    # As if in a distributed job where this probe keeps its statistics per rank: the
    # layer stays in eval mode (no collective) and its output is recomputed with the
    # local batch's statistics.
    monkeypatch.setattr(norm_stats_module, "_synchronizes", lambda m: hasattr(m, "process_group"))
    norm = net.features[0].norm
    modes: list[bool] = []
    handle = norm.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    (record,) = ShiftProbe(net, [layer], x).record_now(0)
    handle.remove()
    assert modes == [False]
    assert_describes(record.stats, expected[layer])
