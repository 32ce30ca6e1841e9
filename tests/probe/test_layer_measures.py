"""Per-layer gradient norms (Xiong et al. 2020) and BatchNorm's batch-statistics
fluctuation (Shen et al. 2020) against independent computations, without side
effects on training; both as callbacks of covshift's loop, through a sweep point into
the store and back as metric paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.data import load_dataset
from covshift.experiments.grid import PointSpec
from covshift.experiments.numbers import load_numbers
from covshift.experiments.point import StoreSink, train_point
from covshift.losses import loss_function
from covshift.models import build_transformer
from covshift.probe.batch_fluctuation import BatchStatsMonitor, batch_statistics_fluctuation
from covshift.probe.layer_gradients import GradientNormMonitor, weight_gradient_norms
from covshift.store import Store
from covshift.training import TrainConfig, train


def _seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def test_gradient_norms_match_autograd_and_leave_training_alone() -> None:
    net = build_transformer(context=16, d_model=16, n_layer=2, n_head=2, norm="batch")
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    found = weight_gradient_norms(net, x, y, loss_fn=_seq_loss)
    # nothing moved: weights, BatchNorm's running statistics, .grad, the random state
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # the reference: autograd on the model itself, weight matrices only
    _seq_loss(net(x), y).backward()
    expected = {
        name: float(
            torch.cat([p.grad.reshape(-1) for p in m.parameters(False) if p.dim() >= 2]).norm()
        )
        for name, m in net.named_modules()
        if any(p.dim() >= 2 for p in m.parameters(False))
    }
    assert list(found) == list(expected)  # module order
    assert "blocks.1.mlp.c_proj" in found and "wte" in found and "blocks.0.ln_1.norm" not in found
    for name, value in expected.items():
        assert found[name] == pytest.approx(value, rel=1e-5), name


def test_post_norm_gradients_at_init_grow_towards_the_output_under_unit_init() -> None:
    # Xiong et al.'s Fig. 3 in miniature, an instrument check (not the claim): with the
    # unit-scale init, the last block's FFN gradient is larger under post-norm.
    x = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    norms = {}
    for placement in ("pre", "post"):
        net = build_transformer(
            context=32, d_model=32, n_layer=6, n_head=4, placement=placement, init="unit"
        )
        norms[placement] = weight_gradient_norms(net, x, y, loss_fn=_seq_loss)
    assert norms["post"]["blocks.5.mlp.c_proj"] > norms["pre"]["blocks.5.mlp.c_proj"]


def _fluctuation_reference(xs: list[np.ndarray]) -> dict[str, float]:
    """NumPy: per-channel batch means / variances over rows, then the three figures."""
    mu = np.stack([x.mean(0) for x in xs])  # (K, C)
    v = np.stack([x.var(0) for x in xs])  # (K, C), biased
    n = xs[0].shape[0]
    pooled = v.mean(0)
    between = mu.var(0, ddof=1)
    return {
        "design_effect": n * between.sum() / pooled.sum(),
        "mean_sd": np.sqrt(between.sum() / pooled.sum()),
        "var_cv": np.sqrt(v.var(0, ddof=1).sum() / (pooled**2).sum()),
    }


class _Inputs(nn.Module):
    """A BatchNorm1d fed the batch itself, and a Linear after it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(c)
        self.fc = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


def test_batch_fluctuation_matches_numpy_and_leaves_the_model_alone() -> None:
    gen = np.random.default_rng(0)
    xs = [gen.normal(size=(50, 6)) * [1, 2, 3, 4, 5, 6] + gen.normal(size=6) for _ in range(5)]
    model = _Inputs(6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    found = batch_statistics_fluctuation(model, [torch.tensor(x, dtype=torch.float32) for x in xs])
    assert list(found) == ["bn"]
    for key, value in _fluctuation_reference(xs).items():
        assert found["bn"][key] == pytest.approx(value, rel=1e-4), key
    for k, v in model.state_dict().items():  # running statistics untouched
        assert torch.equal(v, state[k]), k
    assert batch_statistics_fluctuation(nn.Linear(3, 3), [torch.ones(2, 3)] * 2) == {}
    with pytest.raises(ValueError, match="2 or more batches"):
        batch_statistics_fluctuation(model, [torch.ones(4, 6)])


def test_design_effect_is_one_for_independent_values_and_large_for_correlated_ones() -> None:
    gen = np.random.default_rng(1)
    K, seqs, T, C = 400, 8, 16, 4
    iid = [gen.normal(size=(seqs * T, C)) for _ in range(K)]
    # every sequence of T tokens shares an offset: tokens within one are correlated
    shared = [
        (gen.normal(size=(seqs, 1, C)) + 0.5 * gen.normal(size=(seqs, T, C))).reshape(-1, C)
        for _ in range(K)
    ]
    model = _Inputs(C)
    d_iid = batch_statistics_fluctuation(
        model, [torch.tensor(x, dtype=torch.float32) for x in iid]
    )["bn"]
    d_seq = batch_statistics_fluctuation(
        model, [torch.tensor(x, dtype=torch.float32) for x in shared]
    )["bn"]
    assert d_iid["design_effect"] == pytest.approx(1.0, abs=0.15)
    # offset variance 1 against 1.25 in all: D = 1 + (T - 1) * 1 / 1.25 = 13
    assert d_seq["design_effect"] == pytest.approx(13.0, rel=0.2)


def test_monitors_record_through_a_point_into_the_store(tmp_path) -> None:
    data = load_dataset("synthetic-text", context=16, seed=0)
    spec = PointSpec.model_validate(
        {
            "dataset": "synthetic-text",
            "data_dir": None,
            "seed": 0,
            "steps": 20,
            "batch_size": 8,
            "eval_every": 10,
            "device": "cpu",
            "model": {
                "kind": "transformer",
                "width": 16,
                "depth": 2,
                "heads": 2,
                "context": 16,
                "norm": "batch",
            },
            "optimizer": {"kind": "adamw", "lr": 0.003},
            "probe": {
                "layers": ["blocks.*.ln_1"],
                "every": 10,
                "examples": 8,
                "gradient_norm_steps": [0, 20],
                "batch_stats_every": 10,
                "batch_stats_batches": 4,
            },
            "divergence": {},
            "test_examples": 32,
        }
    )
    with Store(tmp_path / "s.db") as store:
        run_id = store.start_run(
            "r", config={"point": spec.model_dump(mode="json")}, seed=0, point=spec.identity()
        )
        outcome = train_point(spec, data, StoreSink(store, run_id))
        assert outcome.status == "finished", outcome.error
        numbers = load_numbers(store, store.run(run_id), planned=(20, 10))
        assert store.probe(run_id, "blocks.1.mlp.c_proj", "weight_grad_norm")[0].tolist() == [0, 20]
    # step 0: the initial weights on the monitor's batch, recomputed here
    net = build_transformer(256, 16, d_model=16, n_layer=2, n_head=2, norm="batch", seed=0)
    x, y = _monitor_batch(data, 8, seed=0, step=0)
    expected = weight_gradient_norms(net, x, y, loss_fn=loss_function(data))
    for layer in ("blocks.0.attn.c_attn", "blocks.1.mlp.c_proj", "head"):
        assert numbers.value(f"grad_norm/0/{layer}") == pytest.approx(expected[layer], rel=1e-5)
    assert numbers.value("grad_norm/20/head") != numbers.value("grad_norm/0/head")
    assert numbers.grad_layers()[:2] == ["wte", "wpe"]
    bn_layers = [f"blocks.{i}.{n}.norm" for i in (0, 1) for n in ("ln_1", "ln_2")] + ["ln_f.norm"]
    effects = [numbers.value(f"batch_stats/design_effect/{layer}") for layer in bn_layers]
    assert all(e is not None and e > 0 for e in effects)
    assert numbers.value("batch_stats/design_effect/mean") == pytest.approx(np.mean(effects))
    assert {layer for layer, stat in numbers.measures if stat == "bn_design_effect"} == set(
        bn_layers
    )


def _monitor_batch(data, size: int, seed: int, step: int):
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(len(data.x_train), (size,), generator=gen)
    return data.x_train[idx], data.y_train[idx]


def test_monitors_do_not_change_training() -> None:
    data = load_dataset("synthetic-text", context=16, seed=0)
    config = TrainConfig(steps=6, batch_size=4, lr=3e-3, optimizer="adamw", eval_every=3)

    def run(callbacks: list) -> dict:
        net = build_transformer(256, 16, d_model=16, n_layer=2, n_head=2, norm="batch", seed=0)
        torch.manual_seed(0)
        train(net, data, config, callbacks=callbacks, device="cpu")
        return net.state_dict()

    plain = run([])
    loss = loss_function(data)
    measured = run(
        [
            GradientNormMonitor(steps=[0, 3], loss_fn=loss),
            BatchStatsMonitor(every=2, batches=3),
        ]
    )
    for k, v in plain.items():
        assert torch.equal(measured[k], v), k
    with pytest.raises(ValueError, match="batches must be an int >= 2"):
        BatchStatsMonitor(every=1, batches=1)
