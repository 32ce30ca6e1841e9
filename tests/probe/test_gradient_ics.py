"""Gradient ICS and landscape smoothness: values against direct computations, and no
side effect at all on training (bitwise)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.data import Dataset
from covshift.models import build_mlp
from covshift.probe import (
    GradientICSMonitor,
    SmoothnessMonitor,
    gradient_ics,
    landscape_smoothness,
)
from covshift.training import TrainConfig, train

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
}


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


def snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state(),
        "training": net.training,
    }


def assert_bitwise_equal(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_bitwise_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)  # type: ignore[arg-type]
        for x, y in zip(a, b, strict=True):  # type: ignore[call-overload]
            assert_bitwise_equal(x, y)
    else:
        assert a == b


def run(name: str, measure: bool, steps: int = 4) -> dict[str, object]:
    """Train with dropout and BN; measure ICS and smoothness at steps 1 and 3 (or not)."""
    net = make_net()
    opt = OPTIMIZERS[name](net.parameters())
    data = torch.Generator().manual_seed(5)
    for step in range(steps):
        x = torch.randn(16, 6, generator=data)
        y = torch.randint(0, 3, (16,), generator=data)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        if measure and step % 2 == 1:  # with live gradients and optimizer state around
            gradient_ics(net, opt, x, y)
            landscape_smoothness(net, x, y, lr=0.1)
        opt.step()
    return snapshot(net, opt)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_measuring_has_no_side_effects(name: str) -> None:
    torch.manual_seed(123)
    plain = run(name, measure=False)
    torch.manual_seed(123)
    measured = run(name, measure=True)
    assert_bitwise_equal(plain, measured)  # params, BN running stats, grads, optimizer, RNG


def test_gradient_ics_against_a_direct_computation() -> None:
    """Plain MLP, SGD with momentum state: G' recomputed by hand for every layer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    for _ in range(2):  # momentum buffers exist
        opt.zero_grad()
        F.cross_entropy(net(x + 0.1), y).backward()
        opt.step()
    found = gradient_ics(net, opt, x, y)
    assert list(found) == ["0", "2", "4"]
    params = list(net.parameters())
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    # The optimizer's update of this batch: buf = 0.9 buf + g; w' = w - 0.2 buf.
    moved = [
        p - 0.2 * (0.9 * opt.state[p]["momentum_buffer"] + g)
        for p, g in zip(params, grads, strict=True)
    ]
    for i, layer in enumerate(["0", "2", "4"]):
        shifted = copy.deepcopy(net)
        with torch.no_grad():
            for k, p in enumerate(shifted.parameters()):
                if k < 2 * i:  # weight and bias of every earlier layer
                    p.copy_(moved[k])
        g2 = torch.autograd.grad(F.cross_entropy(shifted(x), y), list(shifted.parameters()))
        g = torch.cat([grads[2 * i].flatten(), grads[2 * i + 1].flatten()]).double()
        h = torch.cat([g2[2 * i].flatten(), g2[2 * i + 1].flatten()]).double()
        assert found[layer].l2 == pytest.approx((g - h).norm().item(), rel=1e-5, abs=1e-9)
        cos = (g @ h / (g.norm() * h.norm())).item()
        assert found[layer].cos == pytest.approx(cos, rel=1e-6)
        assert found[layer].grad_norm == pytest.approx(g.norm().item(), rel=1e-6)
    assert found["0"].l2 == 0.0 and found["0"].cos == pytest.approx(1.0)  # nothing moves before
    assert found["4"].l2 > 0


def test_forward_order_not_registration_order() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(4, 2)  # registered first, called last
            self.early = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(torch.tanh(self.early(x)))

    net = Reversed()
    found = gradient_ics(
        net, torch.optim.SGD(net.parameters(), lr=0.5), torch.randn(9, 3), torch.randint(0, 2, (9,))
    )
    assert list(found) == ["early", "late"]
    assert found["early"].l2 == 0.0 and found["late"].l2 > 0


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.ln = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dropout=0.2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, 3) -> (N, 2)
        h = self.ln(self.embed(x))
        return self.head(self.attn(h, h, h)[0].mean(dim=1))


def test_gradient_ics_on_a_transformer_block() -> None:
    torch.manual_seed(0)
    net = Attention()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.randn(6, 5, 3), torch.randint(0, 2, (6,))
    rng = torch.get_rng_state()
    found = gradient_ics(net, opt, x, y)
    assert torch.equal(rng, torch.get_rng_state())
    # out_proj is used inside the attention call: it sits with its module, after embed.
    assert list(found) == ["embed", "attn", "attn.out_proj", "head"]
    assert found["embed"].l2 == 0.0
    assert all(0 < found[k].l2 and -1 <= found[k].cos <= 1 for k in ["attn", "head"])


def test_smoothness_against_a_quadratic() -> None:
    """Least squares: g(w) = H w - c with H = 2/n X^T X, so g(w - eta g) - g(w) = -eta H g
    and the effective beta-smoothness is ||H g|| / ||g|| at every step size."""
    torch.manual_seed(0)
    X, t = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    res = landscape_smoothness(
        model, X, t, lr=0.05, loss_fn=lambda out, y: ((out[:, 0] - y) ** 2).mean(), points=5
    )
    w = model.weight.detach()[0].numpy()
    Xn, tn = X.numpy(), t.numpy()
    H = 2 / 30 * Xn.T @ Xn
    g = H @ w - 2 / 30 * Xn.T @ tn
    etas = np.linspace(0.5, 4.0, 5) * 0.05
    losses = [np.mean((Xn @ (w - e * g) - tn) ** 2) for e in etas]
    np.testing.assert_allclose(res.step_sizes, etas)
    np.testing.assert_allclose(res.losses, losses, rtol=1e-10)
    np.testing.assert_allclose(res.grad_changes, etas * np.linalg.norm(H @ g), rtol=1e-8)
    assert res.loss_range == pytest.approx(max(losses) - min(losses), rel=1e-8)
    assert res.grad_predictiveness == pytest.approx(etas[-1] * np.linalg.norm(H @ g), rel=1e-8)
    assert res.beta_smoothness == pytest.approx(np.linalg.norm(H @ g) / np.linalg.norm(g), rel=1e-8)
    with pytest.raises(ValueError, match="step_range"):
        landscape_smoothness(model, X, t, lr=0.05, step_range=(4.0, 0.5))


def test_monitors_in_covshift_train_change_nothing(small_data: Dataset) -> None:
    config = TrainConfig(steps=6, batch_size=32, lr=0.2, momentum=0.9, eval_every=3)
    plain = build_mlp(784, 10, width=8, depth=2, norm="batch", seed=0)
    train(plain, small_data, config, device="cpu")
    net = build_mlp(784, 10, width=8, depth=2, norm="batch", seed=0)
    ics = GradientICSMonitor(every=3)
    smooth = SmoothnessMonitor(steps=[2, 5], points=3)
    train(net, small_data, config, callbacks=[ics, smooth], device="cpu")
    assert_bitwise_equal(plain.state_dict(), net.state_dict())
    assert sorted({r.step for r in ics.records}) == [0, 3, 6]
    assert {r.layer for r in ics.records} == {"hidden.0.linear", "hidden.1.linear", "head"}
    assert all(set(r.stats) >= {"grad_ics_l2", "grad_ics_cos"} for r in ics.records)
    assert [r.step for r in smooth.records] == [2, 5]
    assert smooth.records[0].stats["losses"].shape == (3,)
    np.testing.assert_allclose(
        smooth.records[0].stats["step_sizes"], np.array([0.5, 2.25, 4.0]) * 0.2
    )
