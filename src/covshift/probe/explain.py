"""Why the probe batch failed in the model: the module that rejected it and what it
expects, for any exception the forward raises (torch raises RuntimeError for shapes,
IndexError for token ids outside an embedding's vocabulary, Hugging Face models
ValueError or TypeError for missing or unexpected arguments)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from covshift.probe.batch import ProbeBatch, ProbeBatchError

__all__ = ["expected_input", "explain_failure"]


def expected_input(module: nn.Module) -> str | None:
    """What input ``module`` takes, from its usual attributes (duck-typed)."""
    name = type(module).__name__
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[module.weight.dim() - 2]
        return f"(N, {module.in_channels}, {spatial})"
    if hasattr(module, "in_features"):
        return f"(N, ..., {module.in_features})"
    if hasattr(module, "normalized_shape"):
        return f"(N, ..., {', '.join(str(s) for s in module.normalized_shape)})"
    if hasattr(module, "num_channels"):
        return f"(N, {module.num_channels}, ...)"
    if hasattr(module, "num_features"):
        return f"(N, {module.num_features}, ...)"
    if hasattr(module, "num_embeddings"):
        return f"integer indices in [0, {module.num_embeddings}) ({name})"
    return None


def _last_module(model: nn.Module, batch: ProbeBatch) -> tuple[str, nn.Module, tuple] | None:
    """Re-run the failing forward with a tracer on every leaf module: the last leaf
    entered (the one that failed) and its arguments."""
    last: list[tuple[str, nn.Module, tuple]] = []
    handles = []
    for name, module in model.named_modules():
        if not any(True for _ in module.children()):

            def trace(m: nn.Module, args: tuple, name: str = name) -> None:
                last.append((name, m, args))

            handles.append(module.register_forward_pre_hook(trace))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            batch(model)
    except Exception:  # the same failure again; only the trace matters
        pass
    finally:
        for h in handles:
            h.remove()
    return last[-1] if last else None


def _token_ids(module: nn.Module, args: tuple) -> str:
    """The range of the ids an embedding received, against its vocabulary."""
    ids = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if ids is None or ids.is_floating_point() or ids.numel() == 0:
        return ""
    low, high = int(ids.min()), int(ids.max())
    return (
        f"; the ids it received run from {low} to {high}, and its vocabulary is "
        f"[0, {module.num_embeddings}): pass token ids of this model's tokenizer"
    )


def explain_failure(model: nn.Module, batch: ProbeBatch, error: Exception) -> ProbeBatchError:
    """A :class:`ProbeBatchError` naming the module that rejected ``batch`` and the
    input it expects (the original error's text at the end)."""
    found = _last_module(model, batch)
    where = ""
    if found is not None:
        name, module, args = found
        expected = expected_input(module)
        where = f" in module {name!r} ({module})"
        if expected:
            where += f", which expects input of shape {expected}"
        if hasattr(module, "num_embeddings") and isinstance(error, IndexError):
            where += _token_ids(module, args)
    else:  # it failed before any layer ran: name the first layer with a known shape
        for name, module in model.named_modules():
            expected = expected_input(module) if name else None
            if expected:
                where = (
                    f" before any layer ran; its first layer {name!r} ({module}) expects {expected}"
                )
                break
    return ProbeBatchError(
        f"probe: the model's forward failed on the probe batch ({batch.describe()}){where}. "
        f"Pass a probe_input shaped like a training batch. ({type(error).__name__}: {error})"
    )
