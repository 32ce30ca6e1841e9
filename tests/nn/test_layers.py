"""covshift.nn layers against torch.nn: values, gradients, running stats, state, errors."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import covshift.nn as cn
from covshift.nn import backend, chunked

F32_TOL = {"rtol": 1e-4, "atol": 2e-5}


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return F32_TOL if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}


def _pair(name: str, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """covshift's and torch.nn's layer, the latter's random state loaded into the former."""
    theirs = getattr(nn, name)(*args, **kwargs, dtype=dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    ours = getattr(cn, name)(*args, **kwargs, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _input(shape: tuple, dtype: torch.dtype, memory_format: str, step: int) -> torch.Tensor:
    x = torch.randn(shape, dtype=dtype) * (1 + step) + step
    if memory_format == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif memory_format == "channels_last" and x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif memory_format == "strided":  # a non-contiguous view
        x = torch.cat([x, x], dim=-1)[..., : shape[-1]]
    return x


# Per-channel layers keep a channels_last input channels_last (as torch.nn's BatchNorm
# and GroupNorm do; torch's InstanceNorm returns a contiguous tensor, ours does not).
_KEEPS_FORMAT = {"BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm2d", "InstanceNorm3d"}


def name_of(m: nn.Module) -> str:
    return type(m).__name__


def _check_parity(
    ours: nn.Module,
    theirs: nn.Module,
    shape: tuple,
    dtype: torch.dtype,
    memory_format: str = "contiguous",
    steps: int = 3,
) -> None:
    tol = _tol(dtype)
    for mode in ("train",) * steps + ("eval",):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = _input(shape, dtype, memory_format, steps).requires_grad_()
        x2 = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        y, y2 = ours(x), theirs(x2)
        torch.testing.assert_close(y, y2, **tol)
        assert y.dtype == y2.dtype
        if memory_format == "channels_last" and name_of(ours) in _KEEPS_FORMAT:
            assert y.stride() == x.stride()
        g = torch.randn_like(y)
        y.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x.grad, x2.grad, **tol)
        for (n, p), (_, p2) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
            torch.testing.assert_close(p.grad, p2.grad, **tol, msg=f"grad of {n}")
            p.grad = p2.grad = None
    state, state2 = ours.state_dict(), theirs.state_dict()
    assert list(state) == list(state2)
    for key in state:
        torch.testing.assert_close(state[key], state2[key], **tol, msg=key)


_BN_FLAGS = [
    {"affine": a, "track_running_stats": t, "momentum": m}
    for a, t, m in itertools.product([True, False], [True, False], [0.1, None])
] + [{"bias": False}]

_BN_CASES = [
    ("BatchNorm1d", (5, 3)),
    ("BatchNorm1d", (4, 3, 6)),
    ("BatchNorm2d", (4, 3, 5, 6)),
    ("BatchNorm3d", (2, 3, 3, 4, 2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", _BN_FLAGS, ids=str)
@pytest.mark.parametrize(("name", "shape"), _BN_CASES, ids=lambda v: str(v))
def test_batchnorm_matches_torch(name: str, shape: tuple, flags: dict, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ours, theirs = _pair(name, (3,), flags, dtype)
    _check_parity(ours, theirs, shape, dtype)


_IN_FLAGS = [
    {"affine": a, "track_running_stats": t} for a, t in itertools.product([True, False], repeat=2)
] + [{"affine": True, "track_running_stats": True, "momentum": None}]

_IN_CASES = [
    ("InstanceNorm1d", (4, 3, 6)),
    ("InstanceNorm1d", (3, 6)),  # unbatched
    ("InstanceNorm2d", (2, 3, 5, 4)),
    ("InstanceNorm3d", (2, 3, 3, 4, 2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", _IN_FLAGS, ids=str)
@pytest.mark.parametrize(("name", "shape"), _IN_CASES, ids=lambda v: str(v))
def test_instancenorm_matches_torch(
    name: str, shape: tuple, flags: dict, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    ours, theirs = _pair(name, (3,), flags, dtype)
    _check_parity(ours, theirs, shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("groups", "flags"),
    [(1, {}), (2, {}), (6, {}), (3, {"affine": False}), (2, {"bias": False})],
    ids=str,
)
@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 5), (2, 6, 4, 3), (2, 6, 2, 3, 2)], ids=str)
def test_groupnorm_matches_torch(
    groups: int, flags: dict, shape: tuple, dtype: torch.dtype
) -> None:
    if dtype == torch.float32 and len(shape) == 2 and groups >= 3:
        # One or two values per group: dx is a difference of terms of size rstd·g that
        # cancel (exactly, for M = 1), so both libraries return float32 rounding noise
        # of size eps_machine · rstd. float64 still checks the formula there.
        return
    torch.manual_seed(0)
    ours, theirs = _pair("GroupNorm", (groups, 6), flags, dtype)
    _check_parity(ours, theirs, shape, dtype, steps=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", [{}, {"elementwise_affine": False}, {"bias": False}], ids=str)
@pytest.mark.parametrize(
    ("normalized", "shape"), [(7, (3, 7)), (5, (2, 3, 5)), ((4, 5), (2, 3, 4, 5))], ids=str
)
def test_layernorm_matches_torch(
    normalized: Any, shape: tuple, flags: dict, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    ours, theirs = _pair("LayerNorm", (normalized,), flags, dtype)
    _check_parity(ours, theirs, shape, dtype, steps=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "flags", [{}, {"eps": 1e-3}, {"elementwise_affine": False}, {"eps": 1e-6}], ids=str
)
@pytest.mark.parametrize(
    ("normalized", "shape"), [(7, (3, 7)), (5, (2, 3, 5)), ((4, 5), (2, 3, 4, 5))], ids=str
)
def test_rmsnorm_matches_torch(
    normalized: Any, shape: tuple, flags: dict, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    ours, theirs = _pair("RMSNorm", (normalized,), flags, dtype)
    _check_parity(ours, theirs, shape, dtype, steps=1)


@pytest.mark.parametrize("memory_format", ["channels_last", "strided"])
@pytest.mark.parametrize(
    ("name", "args", "flags", "shape"),
    [
        ("BatchNorm2d", (4,), {}, (3, 4, 5, 6)),
        ("BatchNorm3d", (4,), {}, (2, 4, 3, 2, 5)),
        ("GroupNorm", (2, 4), {}, (3, 4, 5, 6)),
        ("GroupNorm", (4, 4), {}, (2, 4, 3, 2, 5)),
        ("InstanceNorm2d", (4,), {"affine": True, "track_running_stats": True}, (3, 4, 5, 6)),
        ("LayerNorm", ((5, 6),), {}, (3, 4, 5, 6)),
        ("RMSNorm", (6,), {}, (3, 4, 5, 6)),
    ],
    ids=str,
)
def test_memory_formats_match_torch(
    name: str, args: tuple, flags: dict, shape: tuple, memory_format: str
) -> None:
    torch.manual_seed(0)
    ours, theirs = _pair(name, args, flags, torch.float32)
    _check_parity(ours, theirs, shape, torch.float32, memory_format=memory_format)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 5),
    c=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.0, 0.1, 0.9, 1.0, None]),
)
def test_batchnorm_any_shape_matches_torch(
    n: int, c: int, spatial: list[int], affine: bool, track: bool, momentum: float | None
) -> None:
    name = {0: "BatchNorm1d", 1: "BatchNorm1d", 2: "BatchNorm2d", 3: "BatchNorm3d"}[len(spatial)]
    flags = {"affine": affine, "track_running_stats": track, "momentum": momentum}
    torch.manual_seed(n * 100 + c)
    ours, theirs = _pair(name, (c,), flags, torch.float64)
    _check_parity(ours, theirs, (n, c, *spatial), torch.float64, steps=2)


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize(
    ("name", "args", "flags"),
    [
        ("BatchNorm2d", (4,), {}),
        ("BatchNorm1d", (4,), {"affine": False}),
        ("InstanceNorm2d", (4,), {"affine": True, "track_running_stats": True}),
        ("GroupNorm", (2, 4), {}),
        ("LayerNorm", ((4, 3),), {}),
        ("RMSNorm", (4,), {}),
    ],
    ids=str,
)
def test_state_dict_round_trips_both_ways(name: str, args: tuple, flags: dict) -> None:
    torch.manual_seed(0)
    theirs = getattr(nn, name)(*args, **flags)
    ours = getattr(cn, name)(*args, **flags)
    with torch.no_grad():
        for t in theirs.state_dict().values():
            if t.dtype == torch.long:
                t.fill_(7)
            else:
                t.copy_(torch.rand_like(t) + 0.5)
    ours.load_state_dict(theirs.state_dict())  # strict
    back = getattr(nn, name)(*args, **flags)
    back.load_state_dict(ours.state_dict())  # strict
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
        assert ours.state_dict()[key].dtype == value.dtype
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


def test_old_checkpoint_without_num_batches_tracked_loads() -> None:
    state = nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    m = cn.BatchNorm2d(3)
    m.num_batches_tracked.fill_(5)
    m.load_state_dict(state)
    assert int(m.num_batches_tracked) == 5  # kept, not required


@pytest.mark.parametrize(
    ("name", "args", "flags"),
    [
        ("BatchNorm1d", (3,), {"momentum": None, "bias": False}),
        ("BatchNorm3d", (3,), {"affine": False, "track_running_stats": False}),
        ("InstanceNorm2d", (3,), {}),
        ("GroupNorm", (1, 3), {"eps": 1e-3}),
        ("LayerNorm", ((3, 2),), {"elementwise_affine": False}),
        ("RMSNorm", (3,), {}),
        ("RMSNorm", (3,), {"eps": 1e-6}),
    ],
    ids=str,
)
def test_repr_matches_torch(name: str, args: tuple, flags: dict) -> None:
    assert repr(getattr(cn, name)(*args, **flags)) == repr(getattr(nn, name)(*args, **flags))


def test_factory_kwargs_and_reset() -> None:
    m = cn.BatchNorm2d(3, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == m.running_mean.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.long
    m(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    with torch.no_grad():
        m.weight.fill_(3)
    m.reset_parameters()
    assert int(m.num_batches_tracked) == 0
    assert torch.equal(m.running_var, torch.ones(3, dtype=torch.float64))
    assert torch.equal(m.weight, torch.ones(3, dtype=torch.float64))


def test_requires_grad_false_does_not_freeze_running_stats() -> None:
    # torch.nn's behaviour (a known pitfall), kept on purpose: only eval() freezes.
    m = cn.BatchNorm1d(3).requires_grad_(False)
    m(torch.randn(8, 3) + 5)
    assert int(m.num_batches_tracked) == 1 and m.running_mean.abs().sum() > 0
    m.eval()
    before = m.running_mean.clone()
    m(torch.randn(8, 3))
    assert torch.equal(before, m.running_mean)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "args", "shape"),
    [
        ("BatchNorm2d", (8,), (16, 8, 8, 8)),
        ("GroupNorm", (4, 8), (4, 8, 8, 8)),
        ("LayerNorm", (64,), (8, 16, 64)),
        ("RMSNorm", (64,), (8, 16, 64)),
    ],
    ids=str,
)
def test_half_inputs_use_float32_statistics(
    name: str, args: tuple, shape: tuple, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    x = (torch.randn(shape) * 4 + 50).to(dtype).requires_grad_()
    ours = getattr(cn, name)(*args)  # float32 parameters, half input (autocast style)
    exact = getattr(nn, name)(*args).double()
    y = ours(x)
    assert y.dtype == dtype
    want = exact(x.detach().double())
    # Rounding the float32 result once to half: within half an ulp of the half output.
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(y.double(), want, atol=4 * ulp, rtol=ulp)
    if name == "BatchNorm2d":
        torch.testing.assert_close(
            ours.running_mean.double(), exact.running_mean, rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(
            ours.running_var.double(), exact.running_var, rtol=1e-4, atol=1e-6
        )
    y.backward(torch.ones_like(y))
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all()


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_rmsnorm_default_eps_is_the_compute_dtype_epsilon() -> None:
    x = torch.full((2, 4), 1e-4, dtype=torch.float16)
    ours, theirs = cn.RMSNorm(4), nn.RMSNorm(4)
    torch.testing.assert_close(ours(x), theirs(x))
    x64 = torch.full((2, 4), 1e-9, dtype=torch.float64)
    torch.testing.assert_close(ours.double()(x64), theirs.double()(x64))


# ----------------------------------------------------------------------------- equivalences


def test_layernorm_over_chw_with_per_channel_affine_equals_groupnorm_1() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    gn = cn.GroupNorm(1, 4).double()
    with torch.no_grad():
        gn.weight.copy_(torch.randn(4))
        gn.bias.copy_(torch.randn(4))
    ln = cn.LayerNorm((4, 5, 6)).double()
    with torch.no_grad():
        ln.weight.copy_(gn.weight[:, None, None].expand(4, 5, 6))
        ln.bias.copy_(gn.bias[:, None, None].expand(4, 5, 6))
    y_gn, y_ln = gn(x), ln(x)
    torch.testing.assert_close(y_gn, y_ln)
    g = torch.randn_like(y_gn)
    torch.testing.assert_close(
        torch.autograd.grad(y_gn, x, g)[0], torch.autograd.grad(y_ln, x, g)[0]
    )


def test_groupnorm_c_groups_equals_instancenorm_with_affine() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    gn = cn.GroupNorm(4, 4).double()
    inorm = cn.InstanceNorm2d(4, affine=True).double()
    with torch.no_grad():
        gn.weight.copy_(torch.randn(4))
        gn.bias.copy_(torch.randn(4))
    inorm.load_state_dict(gn.state_dict())
    y_gn, y_in = gn(x), inorm(x)
    torch.testing.assert_close(y_gn, y_in)
    g = torch.randn_like(y_gn)
    grads_gn = torch.autograd.grad(y_gn, [x, gn.weight, gn.bias], g)
    grads_in = torch.autograd.grad(y_in, [x, inorm.weight, inorm.bias], g)
    for a, b in zip(grads_gn, grads_in, strict=True):
        torch.testing.assert_close(a, b)


def test_batchnorm_eval_is_an_affine_map_of_the_running_stats() -> None:
    m = cn.BatchNorm1d(3).double()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        m.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        m.weight.copy_(torch.tensor([2.0, 1.0, -1.0]))
        m.bias.copy_(torch.tensor([0.0, 3.0, 1.0]))
    m.eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    want = (x - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias
    torch.testing.assert_close(m(x), want)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("build", "shape", "match"),
    [
        (lambda: cn.BatchNorm1d(3), (1, 3), r"more than 1 value per channel.*\[1, 3\]"),
        (lambda: cn.BatchNorm2d(3), (1, 3, 1, 1), "more than 1 value per channel"),
        (lambda: cn.BatchNorm3d(3), (1, 3, 1, 1, 1), "more than 1 value per channel"),
        (lambda: cn.GroupNorm(3, 3), (1, 3), "more than 1 value per channel"),
        (lambda: cn.InstanceNorm2d(3), (2, 3, 1, 1), "more than 1 spatial element"),
        (lambda: cn.BatchNorm2d(3), (2, 3, 4), r"expected 4D input \(got 3D input\)"),
        (lambda: cn.BatchNorm1d(3), (3,), r"expected 2D or 3D input \(got 1D input\)"),
        (lambda: cn.BatchNorm3d(3), (2, 3, 4, 4), "expected 5D input"),
        (lambda: cn.InstanceNorm2d(3), (2, 3), "expected 3D or 4D input"),
        (lambda: cn.InstanceNorm1d(3, affine=True), (2, 4, 5), "match num_features"),
    ],
)
def test_bad_input_raises_value_error_like_torch(build: Any, shape: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()(torch.randn(shape))


@pytest.mark.parametrize(
    ("build", "shape", "match"),
    [
        (lambda: cn.BatchNorm2d(3), (2, 4, 2, 2), "running_mean should contain 4 elements not 3"),
        (lambda: cn.BatchNorm1d(3, track_running_stats=False), (2, 4), "weight should contain"),
        (lambda: cn.GroupNorm(2, 4), (2, 6, 3), "Expected input with 4 channels"),
        (lambda: cn.GroupNorm(2, 4), (4,), "at least 2 dimensions"),
        (lambda: cn.LayerNorm(5), (2, 4), r"normalized_shape=\[5\]"),
        (lambda: cn.LayerNorm((3, 5)), (2, 4, 5), r"\[\*, 3, 5\]"),
        (lambda: cn.RMSNorm(5), (2, 4), r"normalized_shape=\[5\]"),
    ],
)
def test_wrong_feature_count_raises_runtime_error_like_torch(
    build: Any, shape: tuple, match: str
) -> None:
    with pytest.raises(RuntimeError, match=match):
        build()(torch.randn(shape))


def test_instancenorm_channel_mismatch_without_affine_warns_like_torch() -> None:
    with pytest.warns(UserWarning, match="does not match num_features"):
        cn.InstanceNorm1d(3)(torch.randn(2, 4, 5))


@pytest.mark.parametrize("eps", [0, 0.0, -1e-5, float("nan"), "1e-5"])
@pytest.mark.parametrize(
    "build",
    [
        lambda eps: cn.BatchNorm2d(3, eps=eps),
        lambda eps: cn.InstanceNorm1d(3, eps=eps),
        lambda eps: cn.GroupNorm(1, 3, eps=eps),
        lambda eps: cn.LayerNorm(3, eps=eps),
        lambda eps: cn.RMSNorm(3, eps=eps),
    ],
)
def test_bad_eps_is_rejected_when_built(build: Any, eps: Any) -> None:
    with pytest.raises(ValueError, match="eps must be"):
        build(eps)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: cn.GroupNorm(3, 4), r"num_channels \(4\) must be divisible by num_groups \(3\)"),
        (lambda: cn.GroupNorm(0, 4), "num_groups must be a positive int"),
        (lambda: cn.BatchNorm2d(0), "num_features must be a positive int"),
        (lambda: cn.BatchNorm2d(3, momentum=1.5), r"momentum must be in \[0, 1\]"),
        (lambda: cn.LayerNorm(()), "normalized_shape must be"),
    ],
)
def test_bad_constructor_arguments(build: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


# ----------------------------------------------------------------------------- compile


def test_layers_trace_under_torch_compile() -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()

    def net(kind: Any) -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(2, 4, 3),
            kind.BatchNorm2d(4),
            nn.ReLU(),
            kind.GroupNorm(2, 4),
            nn.Flatten(),
            kind.LayerNorm(36),
        )

    eager, compiled = net(cn), net(cn)
    compiled.load_state_dict(eager.state_dict())
    run = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 2, 5, 5)
    y, y2 = eager(x), run(x)
    torch.testing.assert_close(y, y2)
    # Not y.square().sum(): the last LayerNorm makes that sum a constant (each row's
    # squares sum to its width), so every gradient before it is rounding noise.
    weights = torch.randn(y.shape)
    (y * weights).sum().backward()
    (y2 * weights).sum().backward()
    for p, p2 in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p2.grad)
    torch.testing.assert_close(eager[1].running_var, compiled[1].running_var)


# ----------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    ("name", "args", "flags", "shape"),
    [
        ("BatchNorm2d", (7,), {}, (3, 7, 5, 3)),
        ("BatchNorm1d", (7,), {"affine": False}, (5, 7)),
        ("BatchNorm3d", (5,), {"bias": False}, (2, 5, 3, 2, 3)),
        ("GroupNorm", (3, 9), {}, (7, 9, 4, 3)),
        ("GroupNorm", (1, 4), {"affine": False}, (5, 4, 3, 3)),
        ("InstanceNorm2d", (5,), {"affine": True}, (7, 5, 3, 4)),
        ("LayerNorm", ((4, 3),), {}, (7, 5, 4, 3)),
        ("LayerNorm", (6,), {"bias": False}, (11, 6)),
        ("RMSNorm", (6,), {}, (7, 3, 6)),
        ("RMSNorm", ((3, 6),), {"elementwise_affine": False}, (5, 2, 3, 6)),
    ],
    ids=str,
)
def test_chunked_fast_path_matches_torch(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    args: tuple,
    flags: dict,
    shape: tuple,
    memory_format: str,
    dtype: torch.dtype,
) -> None:
    """Tiny chunks: many pieces along the split dim, the last one shorter. The chunked
    path is forced (the native kernels would otherwise run wherever they build), and
    the recorded choices show it ran, forward and backward."""
    monkeypatch.setattr(chunked, "_CHUNK_BYTES", 40)
    with backend.force("chunked"), backend.report_paths() as choices:
        _chunked_parity(name, args, flags, shape, memory_format, dtype)
    assert {c.path for c in choices} == {backend.Path.CHUNKED}
    assert {c.step for c in choices} == {"forward", "backward"}


def _chunked_parity(
    name: str, args: tuple, flags: dict, shape: tuple, memory_format: str, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    if dtype == torch.bfloat16:
        # Half input, float32 parameters: compare with torch's float64 result.
        ours = getattr(cn, name)(*args, **flags)
        exact = getattr(nn, name)(*args, **flags).double()
        with torch.no_grad():
            for p in exact.parameters():
                p.copy_(torch.randn_like(p))
        ours.load_state_dict(exact.state_dict())
        x = _input(shape, torch.float32, memory_format, 1).to(dtype).requires_grad_()
        x64 = x.detach().double().requires_grad_()
        y, want = ours(x), exact(x64)
        torch.testing.assert_close(y.double(), want, atol=0.05, rtol=0.02)
        g = torch.randn_like(want)
        y.backward(g.to(dtype))
        want.backward(g)
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=0.1, rtol=0.05)
        for p, p64 in zip(ours.parameters(), exact.parameters(), strict=True):
            torch.testing.assert_close(p.grad.double(), p64.grad, atol=0.2, rtol=0.05)
        return
    ours, theirs = _pair(name, args, flags, dtype)
    _check_parity(ours, theirs, shape, dtype, memory_format=memory_format, steps=2)
