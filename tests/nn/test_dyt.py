"""Dynamic Tanh (covshift.nn.DyT) against autograd of the plain formula
``gamma * tanh(alpha * x) + beta``: forward, every gradient, float64 gradcheck and
gradgradcheck, half precision, state dict, torch.compile, the registry, the argument
errors (docs/derivations.md §18)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import covshift.nn as cn
from covshift.nn import DyT, create_norm, norm_kind
from covshift.nn.dyt import dyt

F64 = torch.float64


def _plain(x: torch.Tensor, alpha, weight, bias) -> torch.Tensor:
    """The formula in torch ops, differentiated by autograd."""
    y = torch.tanh(alpha * x)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def _layer(shape, alpha=0.7, affine=True, bias=True, dtype=F64) -> DyT:
    m = DyT(shape, alpha_init=alpha, elementwise_affine=affine, bias=bias, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the identity affine, so that γ and β matter
        if m.weight is not None:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=F64) + 0.5)
        if m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=F64))
    return m


@pytest.mark.parametrize(
    ("x_shape", "normalized"),
    [((7, 5), 5), ((3, 4, 6), 6), ((2, 3, 4, 5), (4, 5)), ((6,), 6)],
)
@pytest.mark.parametrize(("affine", "bias"), [(True, True), (True, False), (False, True)])
def test_forward_and_backward_match_autograd_of_the_formula(
    x_shape, normalized, affine, bias
) -> None:
    m = _layer(normalized, affine=affine, bias=bias)
    gen = torch.Generator().manual_seed(0)
    # values where tanh saturates (|alpha x| up to ~5) as well as its linear part
    x = (4 * torch.randn(x_shape, generator=gen, dtype=F64)).requires_grad_(True)
    g = torch.randn(x_shape, generator=gen, dtype=F64)
    params = [p for p in (m.alpha, m.weight, m.bias) if p is not None]
    y = m(x)
    grads = torch.autograd.grad(y, [x, *params], g)
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    named = dict(zip(["alpha", "weight", "bias"][: len(params)], ref_params, strict=True))
    if m.weight is None:
        named = {"alpha": ref_params[0]}
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _plain(x_ref, named["alpha"], named.get("weight"), named.get("bias"))
    ref = torch.autograd.grad(y_ref, [x_ref, *ref_params], g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(["x", "alpha", "weight", "bias"], grads, ref, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert grads[1].shape == ()  # dα: one scalar


def test_gradcheck_and_gradgradcheck() -> None:
    m = _layer((3, 4))
    x = torch.randn(2, 5, 3, 4, dtype=F64, requires_grad=True)
    inputs = (x, m.alpha, m.weight, m.bias)
    assert gradcheck(lambda *a: dyt(*a), inputs)
    assert gradgradcheck(lambda *a: dyt(*a), inputs)
    bare = _layer(4, affine=False)
    x2 = torch.randn(6, 4, dtype=F64, requires_grad=True)
    assert gradcheck(lambda x, a: dyt(x, a), (x2, bare.alpha))
    assert gradgradcheck(lambda x, a: dyt(x, a), (x2, bare.alpha))


def test_only_requested_gradients_are_computed() -> None:
    m = _layer(4)
    m.alpha.requires_grad_(False)
    m.bias.requires_grad_(False)
    x = torch.randn(3, 4, dtype=F64)  # no gradient for x either
    m(x).sum().backward()
    assert m.alpha.grad is None and m.bias.grad is None
    torch.testing.assert_close(m.weight.grad, torch.tanh(0.7 * x).sum(0))


def test_saves_nothing_full_size_but_the_input() -> None:
    m = _layer(64)
    x = torch.randn(32, 64, dtype=F64, requires_grad=True)
    y = m(x)
    saved = [t for t in y.grad_fn.saved_tensors if t.numel() == x.numel()]
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype: torch.dtype) -> None:
    m64 = _layer(16)
    m = _layer(16, dtype=dtype)
    with torch.no_grad():
        for p, q in zip(m.parameters(), m64.parameters(), strict=True):
            p.copy_(q)  # the half layer's parameters, rounded
    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(8, 16, generator=gen)).to(dtype).requires_grad_(True)
    g = torch.randn(8, 16, generator=gen).to(dtype)
    y = m(x)
    grads = torch.autograd.grad(y, [x, m.alpha, m.weight, m.bias], g)
    # The float64 computation of the same (rounded) numbers: a float32 computation
    # rounded once at the end is within one rounding of the half dtype from it.
    x64 = x.detach().double().requires_grad_(True)
    ref_params = [p.detach().double().requires_grad_(True) for p in m.parameters()]
    y64 = _plain(x64, *ref_params)
    ref = torch.autograd.grad(y64, [x64, *ref_params], g.double())
    assert y.dtype == dtype and all(a.dtype == dtype for a in grads)
    tol = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    for name, a, b in zip(["x", "alpha", "weight", "bias"], grads, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=name)


def test_parameters_init_and_state_dict_round_trip() -> None:
    m = DyT((3, 4), alpha_init=0.25)
    assert m.alpha.shape == () and m.alpha.item() == 0.25
    assert torch.equal(m.weight, torch.ones(3, 4)) and torch.equal(m.bias, torch.zeros(3, 4))
    assert list(m.state_dict()) == ["alpha", "weight", "bias"]
    trained = _layer((3, 4), alpha=1.3, dtype=torch.float32)
    fresh = DyT((3, 4))
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    m.reset_parameters()
    assert m.alpha.item() == 0.25
    assert "alpha_init=0.25" in repr(m)
    no_bias = DyT(4, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["alpha", "weight"]


def test_layernorms_affine_carries_over_and_convert_keeps_it() -> None:
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    model = nn.Sequential(nn.Linear(4, 8), ln)
    converted = cn.convert(model, to="dyt")
    assert isinstance(converted[1], DyT)
    torch.testing.assert_close(converted[1].weight, ln.weight)
    torch.testing.assert_close(converted[1].bias, ln.bias)


def test_trains_under_torch_compile_as_eagerly() -> None:
    eager, compiled = _layer(6), _layer(6)
    run = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 5, 6, generator=gen, dtype=F64, requires_grad=True)
        weights = torch.randn(4, 5, 6, generator=gen, dtype=F64)
        ye, yc = eager(x), run(x)
        torch.testing.assert_close(yc, ye)
        ge = torch.autograd.grad((ye * weights).sum(), [x, *eager.parameters()])
        gc = torch.autograd.grad((yc * weights).sum(), [x, *compiled.parameters()])
        for a, b in zip(gc, ge, strict=True):
            torch.testing.assert_close(a, b)


def test_registry_builds_it_for_features_last() -> None:
    layer = create_norm("dyt", 8, alpha_init=0.1)
    assert type(layer) is DyT and layer.alpha.item() == pytest.approx(0.1)
    assert norm_kind(layer) == "dyt" and "dyt" in cn.norm_names()
    with pytest.raises(ValueError, match=r"dyt acts on the trailing features .* dims=2"):
        create_norm("dyt", 8, dims=2)
    with pytest.raises(ValueError, match="normalization 'dyt' takes no keyword 'eps'"):
        create_norm("dyt", 8, eps=1e-5)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"normalized_shape": 0}, "normalized_shape must be a positive int"),
        ({"normalized_shape": ()}, "normalized_shape must be a positive int"),
        ({"normalized_shape": (4, -1)}, "normalized_shape must be a positive int"),
        ({"normalized_shape": 4.0}, "normalized_shape must be a positive int"),
        ({"normalized_shape": 4, "alpha_init": 0.0}, "alpha_init must be a positive finite"),
        ({"normalized_shape": 4, "alpha_init": -0.5}, "alpha_init must be a positive finite"),
        ({"normalized_shape": 4, "alpha_init": float("nan")}, "alpha_init must be a positive"),
        ({"normalized_shape": 4, "alpha_init": True}, "alpha_init must be a positive finite"),
    ],
)
def test_bad_arguments_name_what_is_accepted(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DyT(**kw)


def test_bad_inputs_name_the_shapes() -> None:
    m = DyT(4)
    with pytest.raises(RuntimeError, match=r"normalized_shape=\[4\], expected input with shape"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match="alpha must be a 0-d tensor"):
        dyt(torch.randn(3, 4), torch.ones(1))
    with pytest.raises(ValueError, match=r"bias must have the shape normalized_shape=\[4\]"):
        dyt(torch.randn(3, 4), torch.tensor(0.5), torch.ones(4), torch.zeros(3))
