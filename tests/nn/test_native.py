"""The fused native CPU kernels against torch.nn, with the native path on and off.

The extension builds once per session (the first test that needs it; later sessions
load the cached build). Tests marked with the ``native`` fixture run twice: "on"
(skipped cleanly if the extension cannot be built here) and "off" (the pure-PyTorch
path), so both paths are held to the same parity with torch.nn.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import covshift.nn as cn
from covshift.nn import _native, backend
from covshift.nn import functional as F


@pytest.fixture(params=["on", "off"])
def native(request: pytest.FixtureRequest) -> Iterator[bool]:
    on = request.param == "on"
    if on:
        with _native.use_native(True):
            if not _native.available():
                pytest.skip("the native extension cannot be built here")
    with _native.use_native(on):
        yield on


def _native_used(choices: list[backend.Choice]) -> bool:
    """Whether the C++ autograd node ran, from the recorded path choices."""
    return any(c.path is backend.Path.NATIVE for c in choices)


# (torch.nn factory, covshift factory, input shape, memory format)
CL, CL3 = torch.channels_last, torch.channels_last_3d
CASES = [
    ("BatchNorm1d", (100,), (60, 100), None),  # Ioffe's MLP layer
    ("BatchNorm1d", (13,), (7, 13, 5), None),
    ("BatchNorm2d", (17,), (3, 17, 5, 7), None),  # C not a multiple of the vector width
    ("BatchNorm2d", (17,), (3, 17, 5, 7), CL),
    ("BatchNorm2d", (3,), (2, 3, 1, 1), None),  # one spatial element
    ("BatchNorm2d", (5,), (1, 5, 3, 1), CL),  # N = 1
    ("BatchNorm3d", (4,), (2, 4, 3, 2, 5), CL3),
    ("GroupNorm", (3, 12), (2, 12, 5, 7), None),
    ("GroupNorm", (1, 5), (3, 5, 9), None),
    ("GroupNorm", (4, 8), (2, 8, 3, 3), CL),  # falls back (not contiguous rows)
    ("InstanceNorm2d", (6,), (2, 6, 4, 9), None),
    ("LayerNorm", (37,), (4, 3, 37), None),
    ("LayerNorm", ((3, 1, 5),), (4, 3, 1, 5), None),
    ("RMSNorm", (19,), (6, 19), None),
]


def _build(name: str, args: tuple, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    kw = {"affine": True} if name.startswith("InstanceNorm") else {}
    theirs = getattr(nn, name)(*args, **kw).to(dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    ours = getattr(cn, name)(*args, **kw).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: {"rtol": 1e-10, "atol": 1e-10},
        torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    }[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "args", "shape", "fmt"), CASES, ids=lambda v: str(v))
def test_parity_with_torch(
    native: bool,
    name: str,
    args: tuple,
    shape: tuple[int, ...],
    fmt: torch.memory_format | None,
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    theirs, ours = _build(name, args, dtype)
    for step in range(3):  # running statistics too
        x0 = torch.randn(shape, dtype=dtype) * 2 + step
        g = torch.randn(shape, dtype=dtype)
        if fmt is not None:
            x0, g = x0.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
        outs = []
        for layer in (theirs, ours):
            x = x0.clone().requires_grad_()
            y = layer(x)
            grads = torch.autograd.grad(y, [x, *layer.parameters()], g)
            outs.append((y, grads))
        (y_t, g_t), (y_o, g_o) = outs
        torch.testing.assert_close(y_o, y_t, **_tol(dtype))
        if fmt is not None:
            assert y_o.is_contiguous(memory_format=fmt)
        for a, b in zip(g_o, g_t, strict=True):
            torch.testing.assert_close(a, b, **_tol(dtype))
    for key, buf in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], buf, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "args", "shape", "fmt"),
    [CASES[0], CASES[3], CASES[7], CASES[11], CASES[13]],
    ids=lambda v: str(v),
)
def test_half_inputs(
    native: bool,
    name: str,
    args: tuple,
    shape: tuple[int, ...],
    fmt: torch.memory_format | None,
    dtype: torch.dtype,
) -> None:
    """16-bit inputs, float32 parameters and statistics, against a float64 reference."""
    torch.manual_seed(0)
    ref, ours = _build(name, args, torch.float64)
    ours.float()
    x0 = (torch.randn(shape) * 2 + 1).to(dtype)
    g = torch.randn(shape).to(dtype)
    if fmt is not None:
        x0, g = x0.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    x = x0.clone().requires_grad_()
    y = ours(x)
    assert y.dtype == dtype
    grads = torch.autograd.grad(y, [x, *ours.parameters()], g)
    xr = x0.double().requires_grad_()
    yr = ref(xr)
    grads_r = torch.autograd.grad(yr, [xr, *ref.parameters()], g.double())
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.float16 else {"rtol": 5e-2, "atol": 5e-2}
    torch.testing.assert_close(y.double(), yr, **tol)
    for a, b in zip(grads, grads_r, strict=True):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, b / scale, **tol)


@pytest.mark.parametrize(
    ("build", "shape", "fmt"),
    [
        (lambda: cn.BatchNorm2d(3), (3, 3, 2, 2), None),
        (lambda: cn.BatchNorm2d(3), (3, 3, 2, 2), CL),
        (lambda: cn.BatchNorm1d(5), (4, 5), None),
        (lambda: cn.GroupNorm(2, 4), (2, 4, 3), None),
        (lambda: cn.InstanceNorm1d(3, affine=True), (2, 3, 4), None),
        (lambda: cn.LayerNorm(6), (3, 6), None),
        (lambda: cn.RMSNorm(5), (3, 5), None),
    ],
    ids=["bn2d", "bn2d-cl", "bn1d", "gn", "in1d", "ln", "rms"],
)
def test_gradcheck(
    native: bool,
    build: Callable[[], nn.Module],
    shape: tuple[int, ...],
    fmt: torch.memory_format | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """float64 gradcheck (the native backward) and gradgradcheck (the graph path)."""
    torch.manual_seed(0)
    layer = build().double()
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_()

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    node = fn(x, *params).grad_fn.name()
    assert ("NormalizeNode" in node) == native, node  # the C++ autograd node
    assert gradcheck(fn, (x, *params))  # its backward: the native kernels
    assert gradgradcheck(fn, (x, *params))  # create_graph: its differentiable ATen path


@pytest.mark.parametrize(
    ("name", "shape", "dtype"),
    [
        ("LayerNorm", (4100, 1027), torch.float32),  # rows not 64-byte aligned: head, tail
        ("RMSNorm", (2, 2048, 1024), torch.float32),  # aligned rows
        ("LayerNorm", (2050, 1031), torch.float64),
    ],
)
def test_large_rows_streamed(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Outputs of 16 MB or more take streaming stores (norm_kernels.h, kStreamBytes)."""
    with _native.use_native(True):
        if not _native.available():
            pytest.skip("the native extension cannot be built here")
        torch.manual_seed(0)
        theirs, ours = _build(name, (shape[-1],), dtype)
        x0 = torch.randn(shape, dtype=dtype) * 3 + 1
        g = torch.randn(shape, dtype=dtype)
        assert x0.nbytes >= 16 << 20
        outs = []
        for layer in (theirs, ours):
            x = x0.clone().requires_grad_()
            y = layer(x)
            outs.append((y, *torch.autograd.grad(y, [x, *layer.parameters()], g)))
        assert "NormalizeNode" in outs[1][0].grad_fn.name()
        tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else _tol(dtype)
        for a, b in zip(outs[1], outs[0], strict=True):
            torch.testing.assert_close(a, b, **tol)


def test_compiled_autograd_declines_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under compiled autograd the layers take the pure path's autograd.Function (the C++
    node has no compiled_args), and gradients match eager ones."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    with _native.use_native(True):
        if not _native.available():
            pytest.skip("the native extension cannot be built here")
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(8, 12), cn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 6), cn.BatchNorm1d(6)
        )
        x = torch.randn(5, 8, requires_grad=True)
        # A random weighting of the output, not its sum of squares: after the last
        # BatchNorm (identity affine) that is a constant, and its gradients rounding noise.
        weights = torch.randn(5, 6)

        def grads() -> list[torch.Tensor]:
            model.zero_grad()
            x.grad = None
            (model(x) * weights).sum().backward()
            return [x.grad.clone(), *(p.grad.clone() for p in model.parameters())]

        with torch.no_grad():
            state = {k: v.clone() for k, v in model.state_dict().items()}
        eager = grads()
        assert "NormalizeNode" in model[1](torch.randn(2, 12, requires_grad=True)).grad_fn.name()
        model.load_state_dict(state)
        with (
            backend.report_paths() as choices,
            compiled_autograd._enable(torch.compile(backend="eager")),
        ):
            y = model[1](torch.randn(2, 12, requires_grad=True))
            assert "NormalizeNode" not in y.grad_fn.name()
            compiled = grads()
        assert not _native_used(choices)
        for a, b in zip(compiled, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        # The config flag enables it inside a compiled training step.
        model.load_state_dict(state)
        # Through torch's own config patcher, which restores the entry exactly: undoing
        # a monkeypatch of the config module left `compiled_autograd` hidden (every
        # later torch.compile raised "compiled_autograd does not exist"; seen with a
        # fresh HOME, where this test is the one that builds the native kernels).
        with torch._dynamo.config.patch(compiled_autograd=True):

            @torch.compile(backend="eager")
            def step() -> list[torch.Tensor]:
                return grads()

            for a, b in zip(step(), eager, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch._dynamo.reset()


def test_native_path_is_taken() -> None:
    with _native.use_native(True):
        if not _native.available():
            pytest.skip("the native extension cannot be built here")
        x = torch.randn(4, 6, 3, 3, requires_grad=True)
        layers = (cn.BatchNorm2d(6), cn.GroupNorm(3, 6), cn.LayerNorm((3, 3)), cn.RMSNorm((3, 3)))
        for layer in layers:
            with backend.report_paths() as choices:
                y = layer(x)
                assert "NormalizeNode" in y.grad_fn.name()
                y.sum().backward()
            assert _native_used(choices), layer
        with backend.report_paths() as choices:
            cn.GroupNorm(3, 6)(x.contiguous(memory_format=CL)).sum().backward()
        assert not _native_used(choices)  # channels_last GroupNorm: the reference Function
        y = cn.BatchNorm2d(6)(x)
        (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        assert g.requires_grad  # create_graph: the differentiable graph path


def test_plans() -> None:
    def plan(shape: tuple[int, ...], dims: tuple[int, ...], cl: bool = False, **kw: object):
        w = kw.pop("w", None)
        layout = F.resolve_layout(shape, dims, weight_shape=w, **kw)  # type: ignore[arg-type]
        p = _native._make_plan(layout, cl)
        return None if p is None else (p.kind, p.sizes)

    assert plan((8, 4, 5, 6), (0, 2, 3), w=(4,)) == ("channel", (8, 4, 30))
    assert plan((8, 4, 5, 6), (0, 2, 3), cl=True, w=(4,)) == ("channel", (240, 4, 1))
    assert plan((60, 100), (0,), w=(100,)) == ("channel", (60, 100, 1))
    gn = plan((8, 6, 5, 5), (1, 2, 3), groups=3, w=(6,))
    assert gn == ("row", (24, 50, 3, 2, 25))
    assert plan((8, 6, 5, 5), (2, 3), w=(6,)) == ("row", (48, 25, 6, 1, 25))  # instance
    assert plan((8, 3, 7), (2,), channel_dim=None, w=(7,)) == ("row", (24, 7, 1, 7, 1))
    # One statistic per leading index, no affine: the channel kernel with A = 1 serves.
    assert plan((8, 3, 7), (1, 2), channel_dim=None) == ("channel", (1, 8, 21))
    assert plan((8, 6, 5, 5), (1, 2, 3), cl=True, groups=3) is None
    assert plan((2, 4, 6, 3), (1, 3), channel_dim=2) is None  # ghost-BN-like: fallback
    # A trailing affine of one value over one kept dim is not one value per channel.
    assert plan((2, 1), (1,), channel_dim=None, w=(1,)) == ("row", (2, 1, 1, 1, 1))


def test_running_stats_version_bumped() -> None:
    bn = cn.BatchNorm1d(4)
    before = bn.running_mean._version, bn.running_var._version
    bn(torch.randn(8, 4))
    assert bn.running_mean._version > before[0]
    assert bn.running_var._version > before[1]


def test_build_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", None)
    monkeypatch.setattr(cpp_extension, "load", broken)
    with _native.use_native(True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randn(5, 3, requires_grad=True)
        y = cn.BatchNorm1d(3)(x)
        y.sum().backward()
        cn.LayerNorm(3)(x)
    assert not _native.available()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no compiler here" in msgs[0]
    torch.testing.assert_close(y, nn.BatchNorm1d(3)(x))


def test_env_var_disables_without_building(tmp_path: object) -> None:
    env = dict(os.environ, COVSHIFT_NATIVE="0", COVSHIFT_CACHE_DIR=str(tmp_path))
    code = (
        "import torch, covshift.nn as cn; from covshift.nn import _native\n"
        "cn.BatchNorm1d(3)(torch.randn(4, 3))\n"
        "assert not _native.enabled() and _native._module is None and not _native.available()\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not any(os.scandir(str(tmp_path)))


def test_a_lock_left_by_a_killed_build_does_not_block_the_next_process(tmp_path) -> None:
    """Up to torch 2.13 the build lock is a file whose mere existence blocks (FileBaton),
    and a process killed mid-build leaves it behind; covshift holds an OS lock instead
    and removes the stale file, so the next process loads the kernels rather than
    waiting forever. From 2.14 torch's own lock is an OS lock on that file (FileLock):
    the file may stay, and must not block either."""
    import shutil
    import subprocess
    import sys

    from covshift.nn import _native

    if _native.load() is None:
        pytest.skip("the native kernels do not build here")
    built = _native.cache_dir() / _native._name()
    cache = tmp_path / "cache"
    shutil.copytree(built, cache / built.name)
    (cache / built.name / "lock").write_text("")  # as a SIGKILL mid-build leaves it
    code = "from covshift.nn import _native; print(_native.load() is not None)"
    env = dict(os.environ, COVSHIFT_CACHE_DIR=str(cache))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
    # A CUDA build of torch without a GPU logs a CUDA-home warning when cpp_extension
    # is imported; covshift compiles nothing for CUDA and keeps it off stderr.
    assert "No CUDA runtime" not in proc.stderr
    from torch.utils import cpp_extension

    if hasattr(cpp_extension, "FileBaton"):  # a file that blocks while it exists
        assert not (cache / built.name / "lock").exists()
