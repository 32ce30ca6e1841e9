"""How much memory a configured network needs, known before it is built.

A width of 1e10 or a stack of huge convolutions would otherwise be found out by the
allocator: a traceback, or, where the kernel overcommits memory, a process killed
later while the weights are written. The preflight compares a lower bound on the
network's training memory with what the device has free and refuses the point first.

The bound counts the weight matrices of the builders in :mod:`covshift.models`
(biases, norm parameters and the head's small terms aside) and one float per unit per
example of the training batch for each layer's output:

    bytes >= 4 * (2 * weights + batch_size * units)

(weights and their gradients; the forward's activations, kept for the backward).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from covshift.experiments.config import ModelSpec

__all__ = ["ModelSize", "available_bytes", "model_size"]


@dataclass(frozen=True)
class ModelSize:
    """Lower bounds on a network's weights and on its units per example."""

    weights: int
    units: int

    def training_bytes(self, batch_size: int) -> int:
        """Lower bound on the bytes one float32 training step holds (module docstring)."""
        return 4 * (2 * self.weights + batch_size * self.units)


def model_size(
    spec: ModelSpec, num_features: int, num_classes: int, image_shape: tuple[int, ...] | None
) -> ModelSize:
    """The :class:`ModelSize` of the network ``spec`` builds for this data."""
    if spec.kind == "transformer":
        return _transformer_size(spec, num_classes)
    if spec.kind in ("mlp", "linear"):
        hidden = spec.depth if spec.kind == "mlp" else spec.depth - 1
        width = spec.width
        weights = num_features * width + max(hidden - 1, 0) * width * width
        weights += width * num_classes
        return ModelSize(weights, hidden * width)
    if image_shape is None:  # the builder refuses such data with its own message
        return ModelSize(0, 0)
    in_ch, height, width = image_shape[0], image_shape[1], image_shape[-1]
    weights = units = 0
    if spec.kind == "cnn":
        for i, out_ch in enumerate(spec.channels):
            if i:  # stride 2 after the first block
                height, width = (height + 1) // 2, (width + 1) // 2
            weights += in_ch * out_ch * 9
            units += out_ch * height * width
            in_ch = out_ch
        return ModelSize(weights + in_ch * num_classes, units)
    side = min(height, width)
    for i in range(spec.depth):  # vgg: width * 2**stage channels, 2x2 pool per stage
        out_ch = spec.width * 2 ** (i // spec.convs_per_stage)
        weights += in_ch * out_ch * 9
        units += out_ch * side * side
        in_ch = out_ch
        if (i + 1) % spec.convs_per_stage == 0 and side >= 2:
            side //= 2
    return ModelSize(weights + in_ch * num_classes, units)


def _transformer_size(spec: ModelSpec, vocab: int) -> ModelSize:
    """A transformer's weights (embeddings, per block 4 C^2 of attention and
    2 r C^2 of MLP, the head) and, per sequence, its units: per block the residual
    stream, queries/keys/values and the MLP's hidden layer (4 C + r C per token),
    and the logits."""
    c, r, t = spec.width, spec.mlp_ratio, spec.context
    weights = (vocab + t) * c + spec.depth * (4 + 2 * r) * c * c + c * vocab
    units = t * (spec.depth * (4 + r) * c + vocab)
    return ModelSize(weights, units)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (CUDA: the driver's free bytes; CPU: the kernel's
    MemAvailable), or None where it cannot be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
