"""The one choice of path per call (covshift.nn.backend)."""

from __future__ import annotations

import pytest
import torch

import covshift.nn as cn
from covshift.nn import _native, backend


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
    with _native.use_native(False), backend.force("native"):
        with pytest.raises(RuntimeError, match="force\\('native'\\): native kernels off"):
            cn.LayerNorm(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="'compiled' is not a valid Path"):
        with backend.force("compiled"):
            pass


def test_reports_nothing_outside_the_block() -> None:
    with backend.report_paths() as choices:
        pass
    cn.LayerNorm(3)(torch.randn(2, 3))
    assert choices == []
