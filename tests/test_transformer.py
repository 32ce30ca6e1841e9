"""build_transformer: shapes, causality, every norm kind and placement against a plain
torch.nn twin written here (explicit masked-softmax attention, torch.nn's norms),
the two inits' statistics, argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.models import TRANSFORMER_NORMS, build_transformer
from covshift.models.transformer import TokenBatchNorm

NORMS = ("none", "layer", "rms", "dyt", "batch", "ghost_batch")
SMALL = dict(context=16, d_model=32, n_layer=2, n_head=4)
# Ghost BN with one virtual batch per sequence of the twin's tokens(t=16)
NORM_KWARGS = {"ghost_batch": {"virtual_batch_size": 16}, "dyt": {"alpha_init": 0.8}}


class TwinDyT(nn.Module):
    """Dynamic Tanh as its formula: weight * tanh(alpha * x) + bias."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.8))
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias


class TwinGhostBatchNorm(nn.Module):
    """torch.nn's BatchNorm1d on each run of 16 consecutive tokens (one sequence) in
    training, one after the other; on all tokens with running statistics in eval."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if not self.training:
            return self.norm(flat).view(x.shape)
        return torch.cat([self.norm(chunk) for chunk in flat.split(16)]).view(x.shape)


class TwinBatchNorm(nn.Module):
    """torch.nn's BatchNorm1d over (B, C, T): each feature over the B * T tokens."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def twin_norm(kind: str, c: int) -> nn.Module:
    return {
        "none": nn.Identity,
        "layer": nn.LayerNorm,
        "rms": nn.RMSNorm,
        "dyt": TwinDyT,
        "batch": TwinBatchNorm,
        "ghost_batch": TwinGhostBatchNorm,
    }[kind](c)


class TwinAttention(nn.Module):
    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        d = c // self.heads
        q, k, v = (
            z.reshape(b, t, self.heads, d).permute(0, 2, 1, 3) for z in self.c_attn(x).chunk(3, -1)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, T)
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        return self.c_proj((weights @ v).permute(0, 2, 1, 3).reshape(b, t, c))


class TwinMLP(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c_fc, self.act, self.c_proj = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class TwinBlock(nn.Module):
    def __init__(self, c: int, heads: int, norm: str, placement: str) -> None:
        super().__init__()
        self.placement = placement
        self.ln_1, self.attn = twin_norm(norm, c), TwinAttention(c, heads)
        self.ln_2, self.mlp = twin_norm(norm, c), TwinMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))


class Twin(nn.Module):
    """nanoGPT's GPT written plainly with torch.nn, with the same module names."""

    def __init__(self, context: int, c: int, layers: int, heads: int, norm: str, placement: str):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(256, c), nn.Embedding(context, c)
        self.blocks = nn.ModuleList(TwinBlock(c, heads, norm, placement) for _ in range(layers))
        self.ln_f = twin_norm(norm if placement == "pre" else "none", c)
        self.head = nn.Linear(c, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def tokens(b: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_context() -> None:
    net = build_transformer(**SMALL)
    assert net(tokens()).shape == (4, 16, 256)
    assert net(tokens(t=5)).shape == (4, 5, 256)  # shorter sequences are fine
    with pytest.raises(ValueError, match="17 tokens is longer than the model's context"):
        net(tokens(t=17))
    assert TRANSFORMER_NORMS == NORMS


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("norm", NORMS)
def test_matches_a_plain_torch_twin(norm: str, placement: str) -> None:
    kw = NORM_KWARGS.get(norm, {})
    ours = build_transformer(**SMALL, norm=norm, placement=placement, seed=3, norm_kwargs=kw)
    twin = Twin(16, 32, 2, 4, norm, placement)
    twin.load_state_dict(ours.state_dict())  # same names, same shapes (strict)
    x = tokens()
    targets = tokens(seed=1)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        twin.train(mode == "train")
        out_a, out_b = ours(x), twin(x)
        torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
        if mode == "train":
            for out in (out_a, out_b):
                F.cross_entropy(out.flatten(0, 1), targets.flatten()).backward()
            for (name, p), q in zip(ours.named_parameters(), twin.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(ours.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # BatchNorm's running statistics too


def test_final_norm_only_with_pre_norm() -> None:
    pre = build_transformer(**SMALL, norm="rms", placement="pre")
    post = build_transformer(**SMALL, norm="rms", placement="post")
    assert type(pre.ln_f).__name__ == "RMSNorm" and isinstance(post.ln_f, nn.Identity)
    none = build_transformer(**SMALL, norm="none")
    assert isinstance(none.blocks[0].ln_1, nn.Identity)  # same names for every kind


# BatchNorm is causal in eval mode only (running statistics): see the next test.
CAUSAL = [
    ("none", "train"),
    ("layer", "train"),
    ("rms", "train"),
    ("dyt", "train"),
    ("batch", "eval"),
    ("ghost_batch", "eval"),
]


@pytest.mark.parametrize(("norm", "mode"), CAUSAL)
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_causal(norm: str, placement: str, mode: str) -> None:
    net = build_transformer(**SMALL, norm=norm, placement=placement)
    net.train(mode == "train")
    x = tokens()
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 256
    with torch.no_grad():
        a, b = net(x), net(y)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_batchnorm_in_training_mixes_the_tokens() -> None:
    # Its batch statistics include later tokens: the training forward is not causal.
    net = build_transformer(**SMALL, norm="batch").train()
    x = tokens()
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 256
    with torch.no_grad():
        assert not torch.allclose(net(x)[:, :9], net(y)[:, :9])


def test_token_batchnorm_normalizes_each_feature_over_all_tokens() -> None:
    net = build_transformer(**SMALL, norm="batch")
    bn = net.blocks[0].ln_1
    assert isinstance(bn, TokenBatchNorm) and type(bn.norm).__module__.startswith("covshift.nn")
    assert bn.channels_last and bn.num_features == 32
    x = torch.randn(3, 16, 32) * 3 + 1
    y = bn(x)
    flat = y.reshape(-1, 32)
    torch.testing.assert_close(flat.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(0, unbiased=False), torch.ones(32), atol=1e-3, rtol=0)
    expected = 0.9 * torch.zeros(32) + 0.1 * x.reshape(-1, 32).mean(0)
    torch.testing.assert_close(bn.norm.running_mean, expected)


def test_gpt2_init() -> None:
    net = build_transformer(context=64, d_model=128, n_layer=4, n_head=4, init="gpt2")
    block = net.blocks[2]
    for w in (net.wte.weight, net.wpe.weight, block.attn.c_attn.weight, block.mlp.c_fc.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 4)
    for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
        assert w.std().item() == pytest.approx(residual, rel=0.05)
    assert net.head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
    assert abs(block.attn.c_attn.weight.mean().item()) < 0.001


def test_unit_init_preserves_the_scale() -> None:
    net = build_transformer(context=64, d_model=128, n_layer=4, n_head=4, init="unit")
    block = net.blocks[1]
    assert net.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert block.attn.c_attn.weight.std().item() == pytest.approx(128**-0.5, rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(128**-0.5, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(512**-0.5, rel=0.05)
    x = torch.randn(8, 64, 128)
    with torch.no_grad():
        out = block.mlp.c_fc(x)
    assert out.std().item() == pytest.approx(1.0, rel=0.1)  # a Linear keeps unit scale


def test_same_seed_same_weights_whatever_the_norm() -> None:
    a = build_transformer(**SMALL, norm="layer", seed=5)
    b = build_transformer(**SMALL, norm="batch", seed=5)
    c = build_transformer(**SMALL, norm="layer", seed=6)
    assert torch.equal(a.blocks[1].mlp.c_fc.weight, b.blocks[1].mlp.c_fc.weight)
    assert not torch.equal(a.blocks[1].mlp.c_fc.weight, c.blocks[1].mlp.c_fc.weight)
    state = torch.random.get_rng_state()
    build_transformer(**SMALL)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "n_head": 4}, r"d_model \(30\) must be a multiple of n_head \(4\)"),
        (
            {"norm": "group"},
            "norm must be one of none, layer, rms, dyt, batch, ghost_batch; got 'group'",
        ),
        ({"placement": "before"}, "placement must be one of pre, post"),
        ({"init": "xavier"}, "init must be one of gpt2, unit"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"norm": "layer", "norm_kwargs": {"momentum": 0.1}}, "unexpected keyword|momentum"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build_transformer(**{**SMALL, **kwargs})


@pytest.mark.parametrize("norm", ["none", "dyt", "layer"])
def test_probe_finds_the_features_of_blocks_and_identity_norms(norm: str) -> None:
    # The blocks' outputs (the residual stream) and the "none" norms say where their
    # features are; the probe takes them from the layers, not by guessing. context ==
    # d_model, so the shape alone could not tell the axes apart.
    from covshift.probe import ShiftProbe

    net = build_transformer(context=32, d_model=32, n_layer=2, n_head=4, norm=norm)
    probe = ShiftProbe(net, ["blocks.*", "blocks.*.ln_1"], tokens(t=32), record="output", every=1)
    with probe:
        records = probe.record_now(0)
    assert {r.layer for r in records} == {"blocks.0", "blocks.1", "blocks.0.ln_1", "blocks.1.ln_1"}
    for r in records:
        assert r.unit_axis.source == "layer" and r.unit_axis.dim == 2, (r.layer, r.unit_axis)
