"""The functional core against torch.nn.functional, NumPy and autograd of a plain reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from covshift.nn import functional as F

SETTINGS = settings(max_examples=25, deadline=None)


def _reference(
    x: torch.Tensor,
    dims: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    subtract_mean: bool,
    groups: int | None,
    channel_dim: int | None,
) -> torch.Tensor:
    """The textbook formula with plain torch ops (autograd differentiates it)."""
    shape = x.shape
    if groups is not None:
        assert channel_dim is not None
        c = channel_dim
        x = x.unflatten(c, (groups, shape[c] // groups))
        dims = tuple(d if d < c else d + 1 for d in dims)
    mean = x.mean(dims, keepdim=True) if subtract_mean else 0.0
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = ((x - mean) / torch.sqrt(var + eps)).reshape(shape)
    view = [1] * len(shape)
    if channel_dim is not None:
        view[channel_dim] = shape[channel_dim]
    if weight is not None:
        y = y * (weight.reshape(view) if channel_dim is not None else weight)
    if bias is not None:
        y = y + (bias.reshape(view) if channel_dim is not None else bias)
    return y


@st.composite
def _cases(draw: st.DrawFn) -> dict:
    """Random shapes, reduce dims, groups, mean subtraction and affine layouts."""
    ndim = draw(st.integers(2, 4))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    channel_dim = draw(st.sampled_from([None, *range(ndim)]))
    dims = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    groups = None
    if channel_dim is not None and channel_dim in dims and draw(st.booleans()):
        groups = draw(st.sampled_from([1, 2, 3]))
        shape[channel_dim] = groups * draw(st.integers(1, 3))
    if channel_dim is None:
        k = draw(st.integers(0, ndim))
        affine_shape = tuple(shape[ndim - k :]) if k else None
    else:
        affine_shape = (shape[channel_dim],) if draw(st.booleans()) else None
    count = int(np.prod([shape[d] for d in dims]))
    if groups is not None:
        count = count // groups
    return {
        "shape": tuple(shape),
        "dims": tuple(sorted(dims)),
        "channel_dim": channel_dim,
        "groups": groups,
        "affine_shape": affine_shape,
        "with_bias": draw(st.booleans()),
        "subtract_mean": draw(st.booleans()) and count > 1,
        "seed": draw(st.integers(0, 2**16)),
    }


@SETTINGS
@given(_cases())
def test_normalize_matches_reference_values_and_gradients(case: dict) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    opts = {"dtype": torch.float64, "generator": gen}
    x = (torch.randn(case["shape"], **opts) * 2 + 1).requires_grad_()
    shape = case["affine_shape"]
    w = torch.randn(shape, **opts).requires_grad_() if shape else None
    b = torch.randn(shape, **opts).requires_grad_() if shape and case["with_bias"] else None
    kw = {
        "eps": 1e-3,
        "subtract_mean": case["subtract_mean"],
        "groups": case["groups"],
        "channel_dim": case["channel_dim"],
    }
    y = F.normalize(x, case["dims"], w, b, **kw)
    y_ref = _reference(x, case["dims"], w, b, **kw)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn(y.shape, **opts)
    inputs = [t for t in (x, w, b) if t is not None]
    for got, want in zip(
        torch.autograd.grad(y, inputs, g),
        torch.autograd.grad(y_ref, inputs, g),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dims", [(0,), (0, 2), (1, 2), (2,), (0, 1, 2)])
@pytest.mark.parametrize("subtract_mean", [True, False])
def test_moments_match_numpy(dims: tuple[int, ...], subtract_mean: bool) -> None:
    x = torch.randn(5, 4, 3, dtype=torch.float64) * 3 + 2
    mean, var = F.moments(x, dims, subtract_mean=subtract_mean)
    a = x.numpy()
    if subtract_mean:
        np.testing.assert_allclose(mean.numpy(), a.mean(axis=dims), rtol=1e-12)
        np.testing.assert_allclose(var.numpy(), a.var(axis=dims), rtol=1e-12)
    else:
        np.testing.assert_allclose(var.numpy(), (a**2).mean(axis=dims), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_get_float32_statistics(dtype: torch.dtype) -> None:
    # A large offset: accumulating in half precision (or E[x²] - E[x]²) loses the
    # variance entirely; float32 two-pass statistics keep it to ~1e-6.
    x = (torch.randn(64, 8, 16, 16) + 100).to(dtype)
    mean, var = F.moments(x, (0, 2, 3))
    assert mean.dtype == var.dtype == torch.float32
    exact = x.double()
    torch.testing.assert_close(mean.double(), exact.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), exact.var((0, 2, 3), correction=0), rtol=1e-4, atol=0)
    y, m2, v2 = F.normalize_with_stats(x, (0, 2, 3), eps=1e-5)
    assert y.dtype == dtype
    assert m2 is not None and m2.dtype == torch.float32
    torch.testing.assert_close(v2, var)
    # The output is the float32 result rounded once to the input dtype.
    want = (
        (exact - exact.mean((0, 2, 3), keepdim=True))
        * torch.rsqrt(exact.var((0, 2, 3), correction=0, keepdim=True) + 1e-5)
    ).to(dtype)
    torch.testing.assert_close(y, want, atol=2e-2 if dtype == torch.bfloat16 else 2e-3, rtol=0)


def test_float32_two_pass_variance_survives_a_large_mean() -> None:
    x = (torch.randn(4096, 4, dtype=torch.float64) + 1e3).float()
    exact = x.double().var(0, correction=0)
    _, var = F.moments(x, 0)
    torch.testing.assert_close(var.double(), exact, rtol=1e-4, atol=0)
    # The one-pass formula E[x²] - E[x]² in float32 would not pass this test.
    naive = (x * x).mean(0) - x.mean(0) ** 2
    assert ((naive.double() - exact).abs() / exact).max() > 1e-3


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 7), (2, 3, 4, 5)])
def test_batch_norm_running_stats_match_torch(momentum: float | None, shape: tuple) -> None:
    torch.manual_seed(0)
    ours = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    theirs = [t.clone() for t in ours]
    count = torch.tensor(0)
    for step in range(1, 5):
        x = torch.randn(shape, dtype=torch.float64) * step + step
        y = F.batch_norm(x, *ours, training=True, momentum=momentum, num_batches_tracked=count)
        factor = momentum if momentum is not None else 1.0 / step
        y_ref = TF.batch_norm(x, *theirs, training=True, momentum=factor)
        torch.testing.assert_close(y, y_ref)
        assert int(count) == step
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(
        F.batch_norm(x, *ours, training=False), TF.batch_norm(x, *theirs, training=False)
    )


def test_batch_norm_without_buffers_uses_batch_statistics() -> None:
    x = torch.randn(5, 3, 2)
    torch.testing.assert_close(
        F.batch_norm(x, None, None, training=True), TF.batch_norm(x, None, None, training=True)
    )


def test_batch_norm_errors() -> None:
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.batch_norm(torch.randn(1, 3), rm, rv, training=True)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        F.batch_norm(torch.randn(2, 3), rm, rv, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        F.batch_norm(torch.randn(2, 3), rm, rv, training=False, eps=-1.0)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        F.batch_norm(torch.randn(2, 3), rm, rv, training=True, momentum=None)
    with pytest.raises(ValueError, match="needs running_mean"):
        F.batch_norm(torch.randn(2, 3), None, None, training=False)
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        F.batch_norm(torch.randn(2, 4), rm, rv, training=True)


def test_instance_norm_running_stats_match_torch() -> None:
    torch.manual_seed(0)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    for _ in range(3):
        x = torch.randn(4, 3, 5, dtype=torch.float64) * 2 + 1
        torch.testing.assert_close(
            F.instance_norm(x, rm, rv, momentum=0.3), TF.instance_norm(x, rm2, rv2, momentum=0.3)
        )
    torch.testing.assert_close((rm, rv), (rm2, rv2))
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(
        F.instance_norm(x, rm, rv, use_input_stats=False),
        TF.instance_norm(x, rm2, rv2, use_input_stats=False),
    )


def test_thin_wrappers_match_torch() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    w6, b6 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    w45, b45 = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(F.group_norm(x, 3, w6, b6), TF.group_norm(x, 3, w6, b6))
    torch.testing.assert_close(F.instance_norm(x), TF.instance_norm(x))
    torch.testing.assert_close(
        F.layer_norm(x, (4, 5), w45, b45), TF.layer_norm(x, (4, 5), w45, b45)
    )
    torch.testing.assert_close(F.rms_norm(x, (4, 5), w45), TF.rms_norm(x, (4, 5), w45))
    torch.testing.assert_close(F.rms_norm(x, 5, eps=1e-3), TF.rms_norm(x, (5,), eps=1e-3))


def test_normalize_with_stats_shapes() -> None:
    x = torch.randn(2, 6, 4, 4)
    _, mean, var = F.normalize_with_stats(x, (1, 2, 3), eps=1e-5, groups=3)
    assert mean is not None and mean.shape == var.shape == (2, 3)
    _, mean, var = F.normalize_with_stats(x, (0, 2, 3), eps=1e-5)
    assert mean is not None and mean.shape == (6,)
    assert not mean.requires_grad
    _, mean, var = F.normalize_with_stats(x, -1, eps=1e-5, subtract_mean=False, channel_dim=None)
    assert mean is None and var.shape == (2, 6, 4)
    torch.testing.assert_close(var, (x * x).mean(-1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduce_dims": ()}, "at least one dim"),
        ({"reduce_dims": (0, 5)}, "reduce_dims must be ints"),
        ({"reduce_dims": (1, -2)}, "names a dim twice"),
        ({"reduce_dims": (1, 2), "groups": 4}, "divides the 6 channels"),
        ({"reduce_dims": (0, 2), "groups": 2}, "must include channel_dim"),
        ({"reduce_dims": (1,), "groups": 2, "channel_dim": None}, "pass channel_dim"),
        ({"reduce_dims": (0, 2), "weight_shape": (5,)}, "shape \\(6,\\)"),
        ({"reduce_dims": (2,), "channel_dim": None, "weight_shape": (3,)}, "trailing dims"),
        ({"reduce_dims": (2,), "weight_shape": (6,), "bias_shape": (3,)}, "same shape"),
    ],
)
def test_resolve_layout_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        F.resolve_layout((2, 6, 4), **kwargs)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_normalize_rejects_bad_eps(eps: float) -> None:
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        F.normalize(torch.randn(2, 3), 0, eps=eps)


def test_wrapper_shape_errors_match_torch() -> None:
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*, 5\]"):
        F.layer_norm(torch.randn(2, 4), 5)
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*5\]"):
        F.rms_norm(torch.randn(2, 4), 5)
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        F.group_norm(torch.randn(2, 6, 3), 4)
    with pytest.raises(RuntimeError, match="Expected weight to be a vector"):
        F.group_norm(torch.randn(2, 6, 3), 2, torch.ones(4))
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        F.instance_norm(torch.randn(2, 3, 1))
