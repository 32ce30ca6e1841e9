"""Batch Renorm, Ghost BN, Santurkar noise and Weight Standardization against
torch.nn, autograd of the explicit formulas, and hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from covshift.nn import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    NoisyNorm,
    TimeVaryingNoise,
    WSConv2d,
    WSLinear,
    create_norm,
)
from covshift.nn.renorm import renorm_limits
from covshift.nn.weight_std import standardize_weight

F64 = torch.float64
SHAPES = {1: [(7, 3), (6, 3, 5)], 2: [(5, 3, 4, 3)], 3: [(3, 3, 2, 3, 2)]}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
RENORM = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
GHOST = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}
# Reach the final r_max/d_max at once (no warmup, no ramps).
NOW = {"warmup_steps": 0, "r_max_ramp_steps": 0, "d_max_ramp_steps": 0}
CASES = [(d, s) for d, shapes in SHAPES.items() for s in shapes]


def _randomize_affine(*mods: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    ref = mods[0]
    if ref.weight is None:
        return
    w = torch.rand(ref.weight.shape, generator=gen, dtype=F64) + 0.5
    b = torch.randn(ref.bias.shape, generator=gen, dtype=F64)
    with torch.no_grad():
        for m in mods:
            m.weight.copy_(w)
            m.bias.copy_(b)


def _grads(mod: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = mod(x)
    params = [p for p in (mod.weight, mod.bias) if p is not None]
    grads = torch.autograd.grad(y, [x, *params], g)
    return [y.detach(), *grads]


def _assert_same_bn_state(a: nn.Module, b: nn.Module) -> None:
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked)


# --------------------------------------------------------------------------------------
# Batch Renorm
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims,shape", CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_renorm_with_rmax1_dmax0_is_batchnorm(dims, shape, affine, momentum):
    # r_max = 1, d_max = 0 from the start: outputs, all grads, running stats and eval
    # all equal torch.nn.BatchNorm's over several steps.
    kw = {"affine": affine, "momentum": momentum, "dtype": F64}
    ours = RENORM[dims](3, r_max=1.0, d_max=0.0, **NOW, **kw)
    ref = TORCH_BN[dims](3, **kw)
    _randomize_affine(ours, ref)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(shape, generator=gen, dtype=F64) * 2 + step
        g = torch.randn(shape, generator=gen, dtype=F64)
        for a, b in zip(_grads(ours, x, g), _grads(ref, x, g), strict=True):
            torch.testing.assert_close(a, b)
        _assert_same_bn_state(ours, ref)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_renorm_during_warmup_is_batchnorm_and_loads_bn_state():
    # The paper's default schedule: plain BN for the first 5000 steps; the buffers
    # are BatchNorm's, so a torch state_dict loads strictly.
    ref = nn.BatchNorm2d(4, dtype=F64)
    ours = BatchRenorm2d(4, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 3, 3, dtype=F64) * 3 + 1
    for _ in range(2):
        torch.testing.assert_close(ours(x), ref(x))
    _assert_same_bn_state(ours, ref)


def _explicit_renorm(x, weight, bias, run_mean, run_var, eps, r_max, d_max):
    """The paper's formula with plain torch ops, r and d detached."""
    dims = (0, *range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    sigma_b = torch.sqrt(var + eps)
    xhat = (x - mean) / sigma_b
    sigma_run = torch.sqrt(run_var.view(view) + eps)
    r = (sigma_b / sigma_run).clamp(1 / r_max, r_max).detach()
    d = ((mean - run_mean.view(view)) / sigma_run).clamp(-d_max, d_max).detach()
    return weight.view(view) * (xhat * r + d) + bias.view(view), r, d


@pytest.mark.parametrize(
    "run_scale,run_shift,r_clips,d_clips",
    [(0.2, 3.0, True, True), (20.0, -0.1, True, False), (1.1, 0.05, False, False)],
)
def test_renorm_r_and_d_are_constants_in_backprop(run_scale, run_shift, r_clips, d_clips):
    # Running statistics far from the batch's make r and d clip (or not, in the third
    # case); outputs and gradients must equal autograd of the explicit formula with
    # r and d detached.
    torch.manual_seed(0)
    m = BatchRenorm2d(3, r_max=2.0, d_max=1.0, dtype=F64, **NOW)
    _randomize_affine(m)
    with torch.no_grad():
        m.running_var.fill_(run_scale)
        m.running_mean.fill_(run_shift)
    run_mean, run_var = m.running_mean.clone(), m.running_var.clone()
    x = (torch.randn(6, 3, 4, 4, dtype=F64) * 1.5 + 0.3).requires_grad_(True)
    g = torch.randn(6, 3, 4, 4, dtype=F64)
    y = m(x)
    dx, dw, db = torch.autograd.grad(y, [x, m.weight, m.bias], g)
    y_ref, r, d = _explicit_renorm(x, m.weight, m.bias, run_mean, run_var, m.eps, 2.0, 1.0)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, [x, m.weight, m.bias], g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref)
    torch.testing.assert_close(db, db_ref)
    # The clips were active (or not) as the case means.
    assert bool(torch.all((r == 2.0) | (r == 0.5))) == r_clips
    assert bool(torch.all(d.abs() == 1.0)) == d_clips
    assert r_clips or bool(torch.all((r > 0.5) & (r < 2.0)))
    # And the running statistics moved as BatchNorm's would.
    ref = nn.BatchNorm2d(3, dtype=F64)
    ref.running_mean.copy_(run_mean), ref.running_var.copy_(run_var)
    ref(x.detach())
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)


def test_renorm_eval_is_batchnorm_eval():
    m = BatchRenorm1d(4, dtype=F64, **NOW)
    ref = nn.BatchNorm1d(4, dtype=F64)
    _randomize_affine(m, ref)
    with torch.no_grad():
        for b in (m, ref):
            b.running_mean.copy_(torch.arange(4.0))
            b.running_var.copy_(torch.arange(1.0, 5.0))
    m.eval(), ref.eval()
    x = torch.randn(5, 4, dtype=F64)
    torch.testing.assert_close(m(x), ref(x))


def test_renorm_schedule_values():
    assert renorm_limits(0) == (1.0, 0.0)
    assert renorm_limits(5000) == (1.0, 0.0)
    r, d = renorm_limits(5000 + 17500)  # half of r's 35k ramp, 7/8 of d's 20k
    assert math.isclose(r, 2.0) and math.isclose(d, 4.375)
    assert renorm_limits(25000)[1] == 5.0  # the paper: d_max 5 at 25k, r_max 3 at 40k
    r, d = renorm_limits(5000 + 10000)  # half of d's ramp
    assert math.isclose(r, 1 + 2 * 10000 / 35000) and math.isclose(d, 2.5)
    assert renorm_limits(40000) == (3.0, 5.0) and renorm_limits(10**7) == (3.0, 5.0)
    # A ramp of zero steps jumps at the end of the warmup.
    assert renorm_limits(9, 2.0, 1.0, 10, 0, 0) == (1.0, 0.0)
    assert renorm_limits(10, 2.0, 1.0, 10, 0, 0) == (2.0, 1.0)


def test_renorm_schedule_counted_by_num_batches_tracked():
    m = BatchRenorm1d(
        2, r_max=3.0, d_max=2.0, warmup_steps=2, r_max_ramp_steps=4, d_max_ramp_steps=2
    )
    x = torch.randn(8, 2)
    seen = []
    for _ in range(8):
        seen.append(m.current_limits())
        r_t, d_t = m._limits(torch.float32)  # the device-side values used in forward
        assert math.isclose(float(r_t), seen[-1][0], rel_tol=1e-6)
        assert math.isclose(float(d_t), seen[-1][1], rel_tol=1e-6)
        m(x)
    assert seen == [
        (1.0, 0.0),
        (1.0, 0.0),
        (1.0, 0.0),
        (1.5, 1.0),
        (2.0, 2.0),
        (2.5, 2.0),
        (3.0, 2.0),
        (3.0, 2.0),
    ]
    m.eval()
    m(x)  # eval does not count
    assert int(m.num_batches_tracked) == 8


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"r_max": 0.5}, "r_max must be a float >= 1"),
        ({"d_max": -1.0}, "d_max must be a float >= 0"),
        ({"warmup_steps": -1}, "warmup_steps must be an int >= 0"),
        ({"r_max_ramp_steps": 1.5}, "r_max_ramp_steps must be an int"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_renorm_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        BatchRenorm2d(3, **kw)


def test_renorm_one_value_per_channel_raises():
    m = BatchRenorm1d(3, **NOW)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3))


def test_renorm_gradcheck_and_gradgradcheck():
    # With r and d treated as constants the backward is the true derivative only where
    # both clip (locally constant): running statistics far from the batch's make
    # r = 1/r_max and d = -d_max in every channel. (Unclipped, the stop-gradient
    # backward is checked against the explicit formula above.)
    m = BatchRenorm2d(3, r_max=1.5, d_max=0.5, dtype=F64, **NOW)
    _randomize_affine(m)
    with torch.no_grad():
        m.running_var.fill_(100.0)
        m.running_mean.fill_(10.0)
    buffers = {k: v.clone() for k, v in m.named_buffers()}

    def g(x, w, b):  # w, b are m's parameters (gradcheck perturbs them in place)
        with torch.no_grad():  # the same running statistics, so the same r, d, each call
            for k, v in m.named_buffers():
                v.copy_(buffers[k])
        return m(x)

    x = torch.randn(4, 3, 2, 2, dtype=F64, requires_grad=True)
    assert gradcheck(g, (x, m.weight, m.bias))
    assert gradgradcheck(g, (x, m.weight, m.bias))


# --------------------------------------------------------------------------------------
# Ghost Batch Norm
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims,shape", CASES)
@pytest.mark.parametrize("vbs", [7, 64])
def test_ghost_with_one_virtual_batch_is_batchnorm(dims, shape, vbs):
    # virtual_batch_size >= N: one virtual batch, plain BatchNorm.
    ours = GHOST[dims](3, virtual_batch_size=vbs, dtype=F64)
    ref = TORCH_BN[dims](3, dtype=F64)
    _randomize_affine(ours, ref)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(shape, generator=gen, dtype=F64) + 1
        g = torch.randn(shape, generator=gen, dtype=F64)
        for a, b in zip(_grads(ours, x, g), _grads(ref, x, g), strict=True):
            torch.testing.assert_close(a, b)
    _assert_same_bn_state(ours, ref)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize(
    "dims,shape,vbs",
    [(1, (12, 3), 4), (1, (10, 3, 2), 4), (2, (9, 3, 2, 2), 2), (3, (4, 3, 2, 2, 2), 2)],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_equals_batchnorm_per_chunk(dims, shape, vbs, momentum):
    # k virtual batches (a shorter last one included) == torch BatchNorm applied to
    # each chunk in order: outputs, grads and running statistics.
    ours = GHOST[dims](3, virtual_batch_size=vbs, momentum=momentum, dtype=F64)
    ref = TORCH_BN[dims](3, momentum=momentum, dtype=F64)
    _randomize_affine(ours, ref)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(shape, generator=gen, dtype=F64) * 2 - 1
        g = torch.randn(shape, generator=gen, dtype=F64)
        xr = x.clone().requires_grad_(True)
        y_ref = torch.cat([ref(c) for c in xr.split(vbs)])
        grads_ref = torch.autograd.grad(y_ref, [xr, ref.weight, ref.bias], g)
        got = _grads(ours, x, g)
        torch.testing.assert_close(got[0], y_ref.detach())
        for a, b in zip(got[1:], grads_ref, strict=True):
            torch.testing.assert_close(a, b)
        _assert_same_bn_state(ours, ref)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 13), vbs=st.integers(2, 6), length=st.integers(1, 3), seed=st.integers(0, 99)
)
def test_ghost_any_batch_and_virtual_size_equals_chunked_batchnorm(n, vbs, length, seed):
    if n % vbs == 1 and length == 1:
        return  # a last chunk of one value per channel: an error, tested below
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, length, generator=gen, dtype=F64)
    ours = GhostBatchNorm1d(2, virtual_batch_size=vbs, dtype=F64)
    ref = nn.BatchNorm1d(2, dtype=F64)
    x = x.squeeze(-1) if length == 1 else x
    torch.testing.assert_close(ours(x), torch.cat([ref(c) for c in x.split(vbs)]))
    _assert_same_bn_state(ours, ref)


def test_ghost_channels_last_and_no_tracking():
    x = torch.randn(8, 3, 4, 4, dtype=F64).to(memory_format=torch.channels_last)
    ours = GhostBatchNorm2d(3, virtual_batch_size=4, track_running_stats=False, dtype=F64)
    ref = nn.BatchNorm2d(3, track_running_stats=False, dtype=F64)
    expected = torch.cat([ref(c) for c in x.split(4)])
    torch.testing.assert_close(ours(x), expected)
    ours.eval(), ref.eval()  # no running stats: eval keeps the virtual-batch statistics
    torch.testing.assert_close(ours(x), torch.cat([ref(c) for c in x.split(4)]))


def test_ghost_errors():
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        GhostBatchNorm1d(3, virtual_batch_size=0)
    m = GhostBatchNorm1d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="last one of 1 sample"):
        m(torch.randn(9, 3))  # chunks of 4, 4 and 1: one value per channel
    m(torch.randn(9, 3, 2))  # the chunk of 1 has 2 values per channel: fine


def test_ghost_gradcheck_and_gradgradcheck():
    m = GhostBatchNorm2d(2, virtual_batch_size=2, dtype=F64)
    _randomize_affine(m)

    def f(x, w, b):  # w, b are m's parameters (gradcheck perturbs them in place)
        return m(x)

    x = torch.randn(5, 2, 2, 2, dtype=F64, requires_grad=True)  # chunks 2, 2, 1
    assert gradcheck(f, (x, m.weight, m.bias))
    assert gradgradcheck(f, (x, m.weight, m.bias))


# --------------------------------------------------------------------------------------
# Santurkar et al.'s noise
# --------------------------------------------------------------------------------------


def test_noise_moments_match_santurkar_distribution():
    noise = TimeVaryingNoise(generator=torch.Generator().manual_seed(0))
    shape = torch.Size([64, 32])  # 2048 elements per draw
    mus, sigmas = [], []
    for _ in range(400):
        s, m = noise.sample(shape, torch.device("cpu"), torch.float64)
        # Per element: m ~ U(mu_t - 0.1, mu_t + 0.1), s ~ N(sigma_t, 0.1).
        mu_t, sigma_t = m.mean().item(), s.mean().item()
        assert m.max() - m.min() <= 0.2 + 1e-12
        assert abs(m.std().item() - 0.2 / math.sqrt(12)) < 0.006
        assert abs(s.std().item() - 0.1) < 0.01
        assert -0.5 - 0.01 <= mu_t <= 0.5 + 0.01 and 1.0 - 0.01 <= sigma_t <= 1.25 + 0.01
        mus.append(mu_t)
        sigmas.append(sigma_t)
    mus_t, sig_t = torch.tensor(mus), torch.tensor(sigmas)
    # Per step: mu_t ~ U(-0.5, 0.5), sigma_t ~ U(1, 1.25) (400 draws: 4-5 sigma bounds).
    assert abs(mus_t.mean().item()) < 0.07
    assert abs(mus_t.var().item() - 1 / 12) < 0.02
    assert abs(sig_t.mean().item() - 1.125) < 0.018
    assert abs(sig_t.var().item() - 0.25**2 / 12) < 0.0015


def test_noise_forward_is_s_times_a_plus_m_and_gradient_is_s():
    a = torch.randn(16, 8, dtype=F64, requires_grad=True)
    y = TimeVaryingNoise(generator=torch.Generator().manual_seed(3))(a)
    s, m = TimeVaryingNoise(generator=torch.Generator().manual_seed(3)).sample(
        a.shape, a.device, F64
    )
    torch.testing.assert_close(y, s * a + m)
    (y.sum()).backward()
    torch.testing.assert_close(a.grad, s)


def test_noise_only_in_training_and_reproducible():
    x = torch.randn(8, 4)
    make = lambda seed: NoisyNorm(nn.BatchNorm1d(4), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = make(0), make(0), make(1)
    ya, yb, yc = a(x), b(x), c(x)
    torch.testing.assert_close(ya, yb)
    assert not torch.allclose(ya, yc)
    assert not torch.allclose(a(x), ya)  # a new draw every step
    a.eval()
    ref = nn.BatchNorm1d(4)
    ref.load_state_dict(a.norm.state_dict())
    ref.eval()
    torch.testing.assert_close(a(x), ref(x))
    assert torch.equal(TimeVaryingNoise().eval()(x), x)


def test_noise_half_precision_and_registry():
    layer = create_norm("batch_noisy", 4, dims=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(layer, NoisyNorm) and isinstance(layer.norm, nn.Module)
    y = TimeVaryingNoise(generator=torch.Generator().manual_seed(0))(torch.randn(4, 3).half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="scale_range"):
        TimeVaryingNoise(scale_range=(2.0, 1.0))


def test_noise_gradcheck_and_gradgradcheck():
    def f(x):  # a fixed seed per call makes the layer a deterministic function
        return TimeVaryingNoise(generator=torch.Generator().manual_seed(0))(x)

    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


# --------------------------------------------------------------------------------------
# Weight Standardization
# --------------------------------------------------------------------------------------


def _explicit_ws(w, eps):
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(std**2 + eps)).view_as(w)


@pytest.mark.parametrize(
    "kw", [{}, {"groups": 2, "stride": 2, "padding": 1}, {"bias": False, "dilation": 2}]
)
def test_wsconv2d_equals_conv_with_standardized_weight(kw):
    torch.manual_seed(0)
    conv = WSConv2d(4, 6, 3, eps=1e-5, dtype=F64, **kw)
    x = torch.randn(2, 4, 7, 7, dtype=F64, requires_grad=True)
    y = conv(x)
    # Hand computation with numpy-style statistics of each filter.
    w = conv.weight.detach().numpy().reshape(6, -1)
    w_hat = (w - w.mean(1, keepdims=True)) / (w.var(1, keepdims=True) + 1e-5) ** 0.5
    w_hat = torch.from_numpy(w_hat).view_as(conv.weight)
    ref_kw = {k: v for k, v in kw.items() if k != "bias"}
    torch.testing.assert_close(y, TF.conv2d(x, w_hat, conv.bias, **ref_kw))
    # Gradients: autograd of the explicit formula.
    g = torch.randn_like(y)
    params = [x, conv.weight] + ([conv.bias] if conv.bias is not None else [])
    got = torch.autograd.grad(y, params, g)
    y_ref = TF.conv2d(x, _explicit_ws(conv.weight, 1e-5), conv.bias, **ref_kw)
    for a, b in zip(got, torch.autograd.grad(y_ref, params, g), strict=True):
        torch.testing.assert_close(a, b)
    flat = conv.standardized_weight().flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(6, dtype=F64))


def test_wslinear_equals_linear_with_standardized_weight():
    torch.manual_seed(0)
    fc = WSLinear(10, 5, dtype=F64)
    x = torch.randn(3, 2, 10, dtype=F64, requires_grad=True)
    y = fc(x)
    y_ref = TF.linear(x, _explicit_ws(fc.weight, fc.eps), fc.bias)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, fc.weight, fc.bias], g)
    ref = torch.autograd.grad(y_ref, [x, fc.weight, fc.bias], g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_ws_gradcheck_and_gradgradcheck():
    for layer, shape in (
        (WSConv2d(2, 3, 2, dtype=F64), (2, 2, 3, 3)),
        (WSLinear(4, 3, dtype=F64), (2, 4)),
    ):

        def f(x, w, b, layer=layer):  # w, b are the layer's parameters, perturbed in place
            return layer(x)

        x = torch.randn(shape, dtype=F64, requires_grad=True)
        assert gradcheck(f, (x, layer.weight, layer.bias))
        assert gradgradcheck(f, (x, layer.weight, layer.bias))


def test_ws_half_weight_and_bad_eps():
    w = torch.randn(4, 3, 3, 3).half()
    out = standardize_weight(w)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), _explicit_ws(w.float(), 1e-6), atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="eps must be > 0"):
        WSConv2d(3, 4, 3, eps=0.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        WSLinear(3, 4, eps=-1.0)


def test_registry_names_build_the_variants():
    assert isinstance(create_norm("batch_renorm", 4, dims=2), BatchRenorm2d)
    ghost = create_norm("ghost_batch", 4, dims=1, virtual_batch_size=8)
    assert isinstance(ghost, GhostBatchNorm1d) and ghost.virtual_batch_size == 8
    assert isinstance(create_norm("ghost_batch", 4, dims=3), GhostBatchNorm3d)


@pytest.mark.parametrize(
    "make,shape",
    [
        (
            lambda: BatchRenorm2d(4, r_max=2.0, d_max=1.0, warmup_steps=1, r_max_ramp_steps=2),
            (6, 4, 3, 3),
        ),
        (lambda: GhostBatchNorm2d(4, virtual_batch_size=4), (10, 4, 3, 3)),
        (lambda: WSConv2d(4, 3, 3), (2, 4, 5, 5)),
    ],
)
def test_variants_train_under_torch_compile(make, shape):
    # Whole graph (no breaks), same outputs, grads and running statistics as eager.
    eager, compiled = make().double(), make().double()  # float64: compare exactly
    compiled.load_state_dict(eager.state_dict())
    run = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(shape, generator=gen, dtype=F64, requires_grad=True)
        y_e, y_c = eager(x), run(x)
        torch.testing.assert_close(y_c, y_e)
        # A random weighting of y, not y.square().sum(): after a normalization with the
        # identity affine the sum of squares is a constant (each channel's squares sum to
        # its count), so the gradients compared would be rounding noise.
        weights = torch.randn(y_e.shape, generator=gen, dtype=F64)
        ge = torch.autograd.grad((y_e * weights).sum(), [x, *eager.parameters()])
        gc = torch.autograd.grad((y_c * weights).sum(), [x, *compiled.parameters()])
        for a, b in zip(gc, ge, strict=True):
            torch.testing.assert_close(a, b)
    for (name, a), b in zip(
        compiled.state_dict().items(), eager.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
