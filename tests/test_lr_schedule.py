"""The learning-rate schedule: cosine decay against torch's CosineAnnealingLR, the
rates a callback sees, SGD training against a plain torch loop with torch's scheduler,
the errors for a decay that cannot be run, and a config's ``optimizer.decay``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from covshift.data import BatchSampler, load_dataset
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.grid import expand_grid, experiment_id
from covshift.experiments.point import train_config
from covshift.models import build_mlp
from covshift.optimizers import learning_rate
from covshift.training import TrainConfig, TrainState, train


def _mlp() -> torch.nn.Module:
    return build_mlp(784, 10, width=16, depth=2, seed=4)


def _torch_cosine(lr: float, steps: int) -> list[float]:
    """The rate torch's CosineAnnealingLR(T_max=steps) gives each of ``steps`` steps."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return rates


@pytest.mark.parametrize("steps", [1, 2, 7, 500])
def test_cosine_is_torchs_cosine_annealing(steps: int) -> None:
    ours = [learning_rate(0.3, 0, t, steps, "cosine") for t in range(1, steps + 1)]
    assert ours == pytest.approx(_torch_cosine(0.3, steps), rel=1e-12, abs=1e-15)
    assert ours[0] == 0.3  # the first step at the full rate, the last above 0
    assert ours[-1] > 0 or steps == 1


def test_cosine_after_a_warmup() -> None:
    # warm-up to the full rate at step 4, then a half cosine over the remaining 6 steps
    rates = [learning_rate(1.0, 4, t, 10, "cosine") for t in range(1, 11)]
    expected = [0.25, 0.5, 0.75, 1.0] + [(1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)]
    assert rates == pytest.approx(expected, rel=1e-15)
    assert learning_rate(1.0, 4, 7, 10, "none") == 1.0


def test_a_callback_sees_the_decayed_rate() -> None:
    data = load_dataset("synthetic", n_train=200, n_test=50, seed=0)
    rates: list[float] = []

    class Watch:
        def on_step_end(self, state: TrainState) -> None:
            rates.append(state.optimizer.param_groups[0]["lr"])

    config = TrainConfig(steps=12, batch_size=10, lr=0.2, lr_decay="cosine", eval_every=0)
    train(_mlp(), data, config, callbacks=[Watch()], device="cpu")
    assert rates == pytest.approx(_torch_cosine(0.2, 12), rel=1e-12)


def test_sgd_with_cosine_decay_matches_a_plain_torch_loop() -> None:
    data = load_dataset("synthetic", n_train=300, n_test=50, seed=1)
    config = TrainConfig(
        steps=40, batch_size=16, lr=0.3, momentum=0.9, lr_decay="cosine", eval_every=0, seed=3
    )
    ours, plain = _mlp(), _mlp()
    train(ours, data, config, device="cpu")
    opt = torch.optim.SGD(plain.parameters(), lr=0.3, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    sampler = BatchSampler(len(data.x_train), 16, seed=3)
    for _ in range(40):
        idx = sampler.next()
        loss = F.cross_entropy(plain(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    # torch's scheduler computes the rates recursively, ours in closed form: the two
    # rates differ in the last bits, the weights by float rounding only
    for (name, a), b in zip(ours.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # ... and far from a run at a constant rate (so the comparison above can fail)
    constant = _mlp()
    flat = TrainConfig(steps=40, batch_size=16, lr=0.3, momentum=0.9, eval_every=0, seed=3)
    train(constant, data, flat, device="cpu")
    gap = max(
        (a - b).abs().max().item()
        for a, b in zip(ours.parameters(), constant.parameters(), strict=True)
    )
    assert gap > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr_decay": "linear"}, "lr_decay must be one of none, cosine, got 'linear'"),
        (
            {"lr_decay": "cosine", "warmup_steps": 10},
            r"cosine decay needs steps \(10\) > warmup_steps \(10\)",
        ),
    ],
)
def test_a_decay_that_cannot_run_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(steps=10, **kwargs)
    with pytest.raises(ValueError, match="decay must be one of none, cosine, got 'step'"):
        learning_rate(0.1, 0, 1, 10, "step")


def _config(**optimizer: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": "c",
            "title": "t",
            "steps": 100,
            "model": {"kind": "mlp", "width": 16, "depth": 2},
            "optimizer": {"lr": 0.1, "momentum": 0.5, **optimizer},
        }
    )


def test_a_configs_decay_reaches_the_training_loop_and_its_identities() -> None:
    (flat,) = expand_grid(_config())
    (cosine,) = expand_grid(_config(decay="cosine"))
    assert train_config(flat.spec).lr_decay == "none"
    assert train_config(cosine.spec).lr_decay == "cosine"
    assert flat.id == "fd94bddc277ede7e"  # as before decay existed
    assert cosine.id != flat.id
    # the experiment keeps its id too (and so its report folder), computed before
    assert experiment_id(_config()) == "c-6084400d"
    assert experiment_id(_config(decay="cosine")) != "c-6084400d"
    # ... as does one with a battery table and a claim (fields added with axis ends)
    claim = {
        "id": "x",
        "text": "t",
        "margin_reason": "r",
        "metric": "test_accuracy/final",
        "network": "default",
        "statistic": "value",
        "rule": "greater",
    }
    with_claim = ExperimentConfig.model_validate(
        {
            **_config().model_dump(exclude={"claims", "battery"}),
            "battery": {"target": 0.6},
            "claims": [claim],
        }
    )
    assert experiment_id(with_claim) == "c-af4cd472"
    with pytest.raises(ValidationError, match=r"optimizer\.decay"):
        _config(decay="step")
