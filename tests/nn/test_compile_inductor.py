"""Models built from covshift's layers train under torch.compile's default backend
(inductor, which generates and compiles C++ on the CPU), in one graph (fullgraph=True),
as they do eagerly.

The layer-level tests compile with ``aot_eager`` (fast, and it checks the traced
graph); these run the whole default pipeline on builder models.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.models import build_cnn, build_mlp


def train(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, compiled: bool
) -> list[float]:
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    forward = torch.compile(net, fullgraph=True) if compiled else net
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp-batch": (lambda: build_mlp(64, 10, width=32, norm="batch", seed=0), (24, 64)),
    "mlp-layer": (lambda: build_mlp(64, 10, width=32, norm="layer", seed=0), (24, 64)),
    "mlp-rms": (lambda: build_mlp(64, 10, width=32, norm="rms", seed=0), (24, 64)),
    "cnn-group": (
        lambda: build_cnn((1, 8, 8), 10, channels=(8, 16), norm="group", seed=0),
        (24, 1, 8, 8),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_builder_models_train_under_inductor_as_eagerly(case: str) -> None:
    torch._dynamo.reset()
    make, shape = CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    y = torch.randint(0, 10, (shape[0],), generator=gen)
    eager, compiled = make(), make()
    eager_losses = train(eager, x, y, steps=4, compiled=False)
    compiled_losses = train(compiled, x, y, steps=4, compiled=True)
    # inductor fuses and reorders float32 reductions: equal up to float rounding
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=name)
    assert eager_losses[-1] < eager_losses[0]  # it did train
