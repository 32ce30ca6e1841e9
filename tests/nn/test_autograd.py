"""The hand-derived backward passes: gradcheck, gradgradcheck, saved memory, torch parity."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import covshift.nn as cn
from covshift.nn import functional as F

D = torch.float64

# (layer, input shape, train mode). Tiny shapes: gradgradcheck is O(numel²).
_LAYERS = [
    (lambda: cn.BatchNorm1d(3), (4, 3), True),
    (lambda: cn.BatchNorm1d(3, momentum=None), (3, 3, 2), True),
    (lambda: cn.BatchNorm2d(3), (2, 3, 2, 2), True),
    (lambda: cn.BatchNorm2d(3), (2, 3, 2, 2), False),  # eval: running statistics
    (lambda: cn.BatchNorm2d(3, affine=False, track_running_stats=False), (2, 3, 2, 2), False),
    (lambda: cn.BatchNorm3d(2, bias=False), (2, 2, 2, 1, 2), True),
    (lambda: cn.InstanceNorm1d(3, affine=True), (2, 3, 4), True),
    (lambda: cn.InstanceNorm2d(2, affine=True, track_running_stats=True), (2, 2, 2, 3), True),
    (lambda: cn.InstanceNorm2d(2, affine=True, track_running_stats=True), (2, 2, 2, 3), False),
    (lambda: cn.InstanceNorm3d(2), (2, 2, 2, 1, 2), True),
    (lambda: cn.GroupNorm(2, 4), (2, 4, 3), True),
    (lambda: cn.GroupNorm(1, 4, affine=False), (2, 4, 2, 2), True),
    (lambda: cn.GroupNorm(4, 4, bias=False), (2, 4, 3), True),
    (lambda: cn.LayerNorm(4), (3, 4), True),
    (lambda: cn.LayerNorm((2, 3), bias=False), (2, 2, 3), True),
    (lambda: cn.LayerNorm(3, elementwise_affine=False), (2, 2, 3), True),
    (lambda: cn.RMSNorm(4), (3, 4), True),
    (lambda: cn.RMSNorm((2, 3), eps=1e-3), (2, 2, 3), True),
    (lambda: cn.RMSNorm(4, elementwise_affine=False), (3, 4), True),
]


def _layer_fn(build: Any, train: bool) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """A pure function of (x, *params) for gradcheck, and the params' values."""
    torch.manual_seed(0)
    layer = build().double().train(train)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
        if getattr(layer, "running_var", None) is not None:
            layer.running_mean.copy_(torch.randn_like(layer.running_mean))
            layer.running_var.copy_(torch.rand_like(layer.running_var) + 0.5)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    return fn, params


@pytest.mark.parametrize(
    ("build", "shape", "train"),
    _LAYERS,
    ids=[f"{b()!r}-{'train' if t else 'eval'}" for b, _, t in _LAYERS],
)
def test_gradcheck_and_gradgradcheck(build: Any, shape: tuple, train: bool) -> None:
    fn, params = _layer_fn(build, train)
    x = (torch.randn(shape, dtype=D) * 2 + 1).requires_grad_()
    assert gradcheck(fn, (x, *params))
    assert gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize("subtract_mean", [True, False])
@pytest.mark.parametrize(
    ("dims", "kw", "affine"),
    [
        ((0, 2), {"channel_dim": 1}, (3,)),
        ((1, 2), {"channel_dim": 1, "groups": 3}, (3,)),
        ((0,), {"channel_dim": None}, (3, 2)),
        ((1,), {"channel_dim": None}, (2,)),  # affine over a non-reduced dim
        ((0, 1), {"channel_dim": 2}, (2,)),
    ],
    ids=str,
)
def test_core_gradgradcheck_over_layouts(
    dims: tuple, kw: dict, affine: tuple, subtract_mean: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, dtype=D, requires_grad=True)
    w = torch.randn(affine, dtype=D, requires_grad=True)
    b = torch.randn(affine, dtype=D, requires_grad=True)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dims, w, b, eps=1e-3, subtract_mean=subtract_mean, **kw)

    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize(
    ("name", "args", "shape"),
    [
        ("BatchNorm2d", (4,), (3, 4, 3, 3)),
        ("GroupNorm", (2, 4), (3, 4, 3, 3)),
        ("InstanceNorm2d", (4,), (3, 4, 3, 3)),
        ("LayerNorm", (5,), (3, 4, 5)),
        ("RMSNorm", (5,), (3, 4, 5)),
    ],
)
def test_gradient_penalty_matches_torch(name: str, args: tuple, shape: tuple) -> None:
    """Double backward in practice: d/dθ of ||d loss / d x||², against torch.nn."""
    torch.manual_seed(0)
    ours = getattr(cn, name)(*args).double()
    theirs = getattr(nn, name)(*args).double()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, dtype=D)
    target = torch.randn(shape, dtype=D)
    results = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_()
        loss = ((layer(xi).tanh() - target) ** 2).sum()
        (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
        penalty = gx.square().sum()
        results.append(torch.autograd.grad(penalty, [xi, *layer.parameters()]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def _saved_bytes(fn: Any) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (distinct storages)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize(
    ("name", "args", "shape"),
    [
        ("BatchNorm2d", (16,), (8, 16, 8, 8)),
        ("GroupNorm", (4, 16), (8, 16, 8, 8)),
        ("InstanceNorm2d", (16,), (8, 16, 8, 8)),
        ("LayerNorm", (64,), (8, 16, 64)),
        ("RMSNorm", (64,), (8, 16, 64)),
    ],
)
def test_saves_no_more_for_backward_than_torch(name: str, args: tuple, shape: tuple) -> None:
    x = torch.randn(shape, requires_grad=True)
    ours = _saved_bytes(lambda: getattr(cn, name)(*args)(x))
    theirs = _saved_bytes(lambda: getattr(nn, name)(*args)(x))
    assert ours <= theirs, (ours, theirs)
    # x itself plus per-statistic vectors: nothing else of x's size.
    assert ours < x.numel() * x.element_size() * 1.25


def test_closed_form_backward_matches_autograd_of_the_forward() -> None:
    """normalize_bwd (the formula) against autograd differentiating plain ops."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, dtype=D, requires_grad=True)
    w = torch.randn(6, dtype=D, requires_grad=True)
    b = torch.randn(6, dtype=D, requires_grad=True)
    layout = F.resolve_layout(x.shape, (1, 2), groups=2, weight_shape=w.shape)
    with torch.no_grad():
        y, mean, rstd, _ = F.normalize_fwd(x, w, b, layout, 1e-5)
    g = torch.randn_like(y)
    dx, dw, db = F.normalize_bwd(g, x.detach(), mean, rstd, w.detach(), layout)
    xg = x.reshape(2 * 4, 3 * 5).reshape(4, 2, 15)
    mu = xg.mean(-1, keepdim=True)
    xhat = ((xg - mu) / torch.sqrt(xg.var(-1, correction=0, keepdim=True) + 1e-5)).reshape(4, 6, 5)
    ref = xhat * w[:, None] + b[:, None]
    want = torch.autograd.grad(ref, [x, w, b], g)
    torch.testing.assert_close((dx, dw, db), want)


def test_only_requested_gradients_are_computed() -> None:
    x = torch.randn(4, 3, 5)
    w = torch.randn(3, requires_grad=True)
    b = torch.randn(3)
    y = F.normalize(x, (0, 2), w, b, eps=1e-5)
    (dw,) = torch.autograd.grad(y.sum() + (y * y).sum(), [w])
    assert dw.shape == (3,)
    assert x.grad is None and b.grad is None


def test_half_precision_gradients_match_float64() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 8, 6, 6)
    g = torch.randn_like(x)
    grads = []
    for dtype in (torch.bfloat16, D):
        xi = x.to(dtype).requires_grad_()
        cn.BatchNorm2d(8).to(dtype)(xi).backward(g.to(dtype))
        grads.append(xi.grad.double())
    torch.testing.assert_close(grads[0], grads[1], atol=0.05, rtol=0.02)
