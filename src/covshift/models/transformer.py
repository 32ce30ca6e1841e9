"""A GPT-style decoder-only language model (:class:`Transformer`, built by
:func:`build_transformer`), with the normalization's kind and placement as arguments.

The architecture is GPT-2's (Radford et al. 2019) in nanoGPT's layout: token and
position embeddings ``wte``, ``wpe``; ``n_layer`` blocks ``blocks.<i>`` of causal
self-attention ``attn`` (``c_attn``, ``c_proj``; torch's
``scaled_dot_product_attention``) and an MLP ``mlp`` (``c_fc``, GELU ``act``,
``c_proj``), each with its norm ``ln_1``/``ln_2``; a final norm ``ln_f``; a linear
``head`` to the vocabulary (not tied to ``wte``: with 256 bytes it is small).

Placement (Xiong et al. 2020, arXiv 2002.04745):

- ``pre`` (GPT-2): ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``, and ``ln_f``
  before the head, since the residual stream itself is never normalized;
- ``post`` (the original Transformer): ``x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))``;
  the stream leaves the last block normalized, so ``ln_f`` is the identity.

Every norm is a covshift.nn layer from its registry (:func:`covshift.nn.create_norm`)
over the model's features, the last axis of the ``(B, T, C)`` values: LayerNorm and
RMSNorm normalize each token; Dynamic Tanh (Zhu et al. 2025) squashes each value,
``γ tanh(α x) + β``, with no statistics (``norm_kwargs = {"alpha_init": ...}``);
BatchNorm normalizes each feature over the ``B * T`` tokens of the batch
(:class:`TokenBatchNorm`), with running statistics in eval mode; ``ghost_batch``
(Ghost BN) over virtual batches of consecutive tokens (with ``virtual_batch_size =
context``, each sequence normalized by its own statistics). With ``norm="none"`` the
norms are identities (:class:`TokenIdentity`, an ``nn.Identity``), so module names
are the same for every kind. Note that a BatchNorm in training mode mixes the
statistics of all tokens, later ones included: its training forward is not causal
(its eval forward is).

Initialization (``init``):

- ``gpt2``: every Linear and Embedding weight ~ N(0, 0.02^2), biases 0, and the two
  residual projections of each block (``attn.c_proj``, ``mlp.c_proj``) ~ N(0,
  (0.02 / sqrt(2 n_layer))^2), so each block starts near the identity (GPT-2;
  nanoGPT's ``_init_weights``);
- ``unit``: unit-scale, the setting of Xiong et al.'s analysis: embeddings ~ N(0, 1)
  and every Linear weight ~ N(0, 1 / fan_in) (each preserves the variance of its
  input), biases 0, no residual scaling: each block's branch is as large as its input.

Norm weights start at 1 and biases at 0. Weights are drawn from a generator seeded
with ``seed``, in module order, so models that differ only in their norm start from
the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from covshift.nn import create_norm

__all__ = [
    "PLACEMENTS",
    "TRANSFORMER_INITS",
    "TRANSFORMER_NORMS",
    "CausalSelfAttention",
    "FeedForward",
    "TokenBatchNorm",
    "TokenIdentity",
    "Transformer",
    "TransformerBlock",
    "TransformerConfig",
    "build_transformer",
]

PLACEMENTS = ("pre", "post")
TRANSFORMER_INITS = ("gpt2", "unit")
GPT2_STD = 0.02


class TokenBatchNorm(nn.Module):
    """A BatchNorm over the tokens of ``(B, T, C)`` values: per feature ``c``, mean
    and variance over the ``B * T`` tokens (Shen et al. 2020's "BN in NLP").

    ``norm`` is a covshift BatchNorm of ``C`` features; the values are seen as
    ``(B * T, C)`` (a view, no copy). ``channels_last`` and ``num_features`` tell the
    probe that the units are the last axis.
    """

    channels_last = True

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.num_features = int(norm.num_features)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.norm(x.reshape(-1, x.shape[-1])).view(x.shape)


class TokenIdentity(nn.Identity):
    """The "norm" of ``norm="none"``: the identity, which tells the probe that its
    ``(B, T, C)`` values have their ``num_features`` features last."""

    channels_last = True

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


def _trailing(kind: str) -> Callable[[int, dict[str, Any]], nn.Module]:
    return lambda c, kw: create_norm(kind, c, **kw)


# How each norm kind is built for (B, T, C) tokens. Norms over the trailing axis
# (LayerNorm, RMSNorm, and Dynamic Tanh, whose affine is per feature on the last axis)
# take the tokens as they are; BatchNorm sees the B*T tokens as its batch.
_TOKEN_NORMS: dict[str, Callable[[int, dict[str, Any]], nn.Module]] = {
    "layer": _trailing("layer"),
    "rms": _trailing("rms"),
    "dyt": _trailing("dyt"),
    "batch": lambda c, kw: TokenBatchNorm(create_norm("batch", c, **kw)),
    # Ghost BN over tokens: statistics per virtual batch of consecutive rows of the
    # (B*T, C) view; virtual_batch_size = T gives each sequence its own statistics.
    "ghost_batch": lambda c, kw: TokenBatchNorm(create_norm("ghost_batch", c, **kw)),
}
TRANSFORMER_NORMS = ("none", *_TOKEN_NORMS)


def _check_choice(arg: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{arg} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class TransformerConfig:
    """The shape and the choices of a :class:`Transformer` (nanoGPT's GPTConfig)."""

    vocab_size: int = 256  # V: bytes
    context: int = 128  # T: the longest sequence (positions of wpe)
    n_layer: int = 4  # blocks
    n_head: int = 4  # attention heads; d_model % n_head == 0
    d_model: int = 128  # C: features of the residual stream
    mlp_ratio: int = 4  # the MLP's hidden width is mlp_ratio * C
    norm: str = "layer"  # none | layer | rms | dyt | batch | ghost_batch
    placement: Literal["pre", "post"] = "pre"
    init: Literal["gpt2", "unit"] = "gpt2"
    norm_kwargs: Mapping[str, Any] = field(default_factory=dict)  # eps, momentum, ...

    def __post_init__(self) -> None:
        for arg in ("vocab_size", "context", "n_layer", "n_head", "d_model", "mlp_ratio"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head}): "
                "each head gets d_model / n_head features"
            )
        _check_choice("norm", self.norm, TRANSFORMER_NORMS)
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("init", self.init, TRANSFORMER_INITS)


def make_token_norm(kind: str, features: int, norm_kwargs: Mapping[str, Any]) -> nn.Module:
    """The norm ``kind`` over the last axis of ``(B, T, features)`` values."""
    if kind == "none":
        return TokenIdentity(features)
    return _TOKEN_NORMS[kind](features, dict(norm_kwargs))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``c_attn`` makes queries, keys and values,
    ``scaled_dot_product_attention(is_causal=True)`` mixes the tokens up to each one,
    ``c_proj`` maps the heads back to the stream."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)
        self.c_proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class FeedForward(nn.Module):
    """The block's MLP: ``c_proj(GELU(c_fc(x)))``, hidden width ``mlp_ratio * C``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.c_fc = nn.Linear(config.d_model, hidden)
        self.act = nn.GELU()
        self.c_proj = nn.Linear(hidden, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.c_proj(self.act(self.c_fc(x)))


class TransformerBlock(nn.Module):
    """One block: attention then MLP, each a residual branch, with its norm placed
    ``pre`` (inside the branch) or ``post`` (after the residual sum). Its output is the
    residual stream after the block, features last (``channels_last``, ``num_features``
    tell the probe)."""

    channels_last = True

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_features = config.d_model
        self.placement = config.placement
        self.ln_1 = make_token_norm(config.norm, config.d_model, config.norm_kwargs)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_token_norm(config.norm, config.d_model, config.norm_kwargs)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if self.placement == "pre":
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}"


class Transformer(nn.Module):
    """A decoder-only language model: byte indices ``(B, T)`` -> logits ``(B, T, V)``
    for the next byte at every position (see the module docstring)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        # Post-norm leaves the last block normalized: no final norm there.
        final = config.norm if config.placement == "pre" else "none"
        self.ln_f = make_token_norm(final, config.d_model, config.norm_kwargs)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        T = idx.shape[1]
        if T > self.config.context:
            raise ValueError(
                f"a sequence of {T} tokens is longer than the model's context "
                f"({self.config.context})"
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _init_weights(model: Transformer, generator: torch.Generator) -> None:
    """GPT-2's or the unit-scale init (module docstring), drawn from ``generator`` in
    module order."""
    config = model.config
    gpt2 = config.init == "gpt2"
    residual_std = GPT2_STD / math.sqrt(2 * config.n_layer)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, GPT2_STD if gpt2 else 1.0, generator=generator)
            elif isinstance(module, nn.Linear):
                if gpt2:
                    std = residual_std if name.endswith(".c_proj") else GPT2_STD
                else:
                    std = 1.0 / math.sqrt(module.in_features)
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()


def build_transformer(
    vocab_size: int = 256,
    context: int = 128,
    *,
    d_model: int = 128,
    n_layer: int = 4,
    n_head: int = 4,
    mlp_ratio: int = 4,
    norm: str = "layer",
    placement: Literal["pre", "post"] = "pre",
    init: Literal["gpt2", "unit"] = "gpt2",
    norm_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Transformer:
    """Build a GPT-style byte-level language model (see the module docstring).

    Args:
        vocab_size: symbols (256 for bytes).
        context: the longest sequence, in tokens.
        d_model: features of the residual stream.
        n_layer: blocks.
        n_head: attention heads (a divisor of ``d_model``).
        mlp_ratio: the MLP's hidden width over ``d_model``.
        norm: ``none``, ``layer``, ``rms``, ``dyt``, ``batch`` or ``ghost_batch``
            (:data:`TRANSFORMER_NORMS`).
        placement: ``pre`` or ``post``.
        init: ``gpt2`` or ``unit``.
        norm_kwargs: keyword arguments of every norm (eps, momentum, ...).
        seed: seed of the weights.

    Example:
        >>> net = build_transformer(context=64, d_model=64, n_layer=2, norm="rms")
        >>> net(torch.randint(0, 256, (8, 64))).shape
        torch.Size([8, 64, 256])
    """
    config = TransformerConfig(
        vocab_size=vocab_size,
        context=context,
        n_layer=n_layer,
        n_head=n_head,
        d_model=d_model,
        mlp_ratio=mlp_ratio,
        norm=norm,
        placement=placement,
        init=init,
        norm_kwargs=dict(norm_kwargs or {}),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # torch's default init, overwritten below, draws here
        model = Transformer(config)
    _init_weights(model, torch.Generator().manual_seed(seed))
    return model
