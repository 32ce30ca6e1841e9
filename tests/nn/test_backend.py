"""The one choice of path per call (covshift.nn.backend) and the layouts it is given."""

from __future__ import annotations

import pytest
import torch

import covshift.nn as cn
from covshift.nn import _native, backend
from covshift.nn import layout as L


@pytest.mark.parametrize(
    ("shape", "groups", "affine"),
    [
        ((8, 4, 5, 6), -1, True),
        ((60, 100), -1, False),
        ((2, 6, 4, 3), 0, True),
        ((2, 6, 7), 3, True),
    ],
)
def test_channel_layout_is_resolve_layouts(shape: tuple, groups: int, affine: bool) -> None:
    """The compile path's flat layouts are the ones the eager path resolves."""
    nd = len(shape)
    dims = {-1: (0, *range(2, nd)), 0: tuple(range(2, nd))}.get(groups, tuple(range(1, nd)))
    w = (shape[1],) if affine else None
    want = L.resolve_layout(shape, dims, groups=groups if groups > 0 else None, weight_shape=w)
    assert L.channel_layout(shape, groups, affine) == want


@pytest.mark.parametrize(("shape", "tail"), [((4, 3, 7), (7,)), ((4, 3, 1, 5), (3, 1, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_trailing_layout_is_resolve_layouts(shape: tuple, tail: tuple, affine: bool) -> None:
    dims = tuple(range(len(shape) - len(tail), len(shape)))
    want = L.resolve_layout(shape, dims, channel_dim=None, weight_shape=tail if affine else None)
    assert L.trailing_layout(shape, tail, affine) == want


@pytest.mark.parametrize("path", ["chunked", "reference"])
def test_forced_path_runs_forward_and_backward(path: str) -> None:
    x = torch.randn(4, 6, 3, 3, requires_grad=True)
    with backend.force(path), backend.report_paths() as choices:
        cn.GroupNorm(3, 6)(x).sum().backward()
    assert [(c.step, c.path.value) for c in choices] == [("forward", path), ("backward", path)]


def test_create_graph_backward_is_the_reference() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    with backend.force("chunked"), backend.report_paths() as choices:
        y = cn.BatchNorm1d(3)(x)
        (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    assert g.requires_grad
    assert [c.path for c in choices] == [backend.Path.CHUNKED, backend.Path.REFERENCE]
    assert "create_graph" in choices[1].reason


def test_a_forced_path_that_cannot_serve_raises() -> None:
    with _native.use_native(False), backend.force("native-node"):
        with pytest.raises(RuntimeError, match="force\\('native-node'\\): native kernels off"):
            cn.LayerNorm(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="cannot be forced"):
        with backend.force("compiled"):
            pass


def test_reports_nothing_outside_the_block() -> None:
    with backend.report_paths() as choices:
        pass
    cn.LayerNorm(3)(torch.randn(2, 3))
    assert choices == []
