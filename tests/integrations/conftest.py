"""Shared by the trainer-callback tests: one torch thread (tiny models), and the
statistics of a layer's input computed with a plain forward hook, independently of
covshift's probe."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plain_input_stats(
    model: nn.Module, layer: str, run: Callable[[nn.Module], Any], unit_dim: int
) -> dict[str, np.ndarray]:
    """Per-unit mean and (biased) std, and the pooled mean and std, of the first
    positional input of ``model.<layer>`` in one eval-mode, no-grad forward ``run(model)``,
    in float64 with numpy."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone())
    )
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            run(model)
    finally:
        handle.remove()
        model.train(was_training)
    values = seen[0].double().cpu().numpy()
    units = np.moveaxis(values, unit_dim, -1).reshape(-1, values.shape[unit_dim])  # (M, U)
    return {
        "mean": units.mean(axis=0),
        "std": units.std(axis=0),
        "pooled_mean": np.array(units.mean()),
        "pooled_std": np.array(units.std()),
    }


def no_hooks(model: nn.Module) -> bool:
    """Whether no module of ``model`` holds a forward (pre-)hook."""
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs")
    return not any(getattr(m, a, None) for m in model.modules() for a in attrs)


@pytest.fixture
def plain_stats() -> Callable[..., dict[str, np.ndarray]]:
    return plain_input_stats


@pytest.fixture
def hookless() -> Callable[[nn.Module], bool]:
    return no_hooks
