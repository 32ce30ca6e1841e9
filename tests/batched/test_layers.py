"""Batched layers against K one-at-a-time layers: every member's forward, backward and
running statistics equal its own layer's (within float32 rounding), for every norm
kind the battery uses, in both layouts; and a member's numbers do not depend on how
many members share the batch (bitwise, where the batched path guarantees it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covshift.batched import BatchedConv2d, BatchedLinear, NotBatchable, stack_models
from covshift.batched.layers import channels_to_rows, rows_to_channels
from covshift.models import build_cnn, build_deep_linear, build_mlp, build_vgg
from covshift.nn import create_norm

K = 3
RENORM = dict(r_max=1.5, d_max=0.5, warmup_steps=0, r_max_ramp_steps=0, d_max_ramp_steps=0)
# (norm, norm_kwargs): the kinds of the battery (and LayerNorm/RMSNorm of an MLP).
MLP_NORMS = [
    ("none", {}),
    ("batch", {}),
    ("batch", {"momentum": None}),
    ("ghost_batch", {"virtual_batch_size": 16}),
    ("batch_renorm", RENORM),
    ("layer", {}),
    ("group", {"num_groups": 4}),
    ("rms", {}),
]
CNN_NORMS = [
    ("none", {}),
    ("batch", {}),
    ("batch_renorm", RENORM),
    ("group", {"num_groups": 4}),
    ("layer", {}),
    ("instance", {}),
]


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 2e-5) -> None:
    scale = a.abs().max().clamp_min(1e-3)
    err = ((a - b).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def _randomize(model: nn.Module, seed: int) -> None:
    """Norm weights, biases and running statistics away from their init, so a mixed-up
    member would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if ".norm" in name and t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def _compare(singles: list[nn.Module], x: torch.Tensor, members_first: bool, train: bool) -> None:
    for single in singles:
        single.zero_grad(set_to_none=True)
    stacked = stack_models(singles)
    gens = [torch.Generator().manual_seed(100 + k) for k in range(K)]
    stacked.use_generators(gens)
    stacked.model.train(train)
    inputs = x if members_first else x.transpose(0, 1).contiguous()
    out = stacked.model(inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    out.backward(grad)
    for k, single in enumerate(singles):
        single.train(train)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + k)  # the member's stream is its global one alone
            y = single(x[k])
        y.backward(grad[k])
        _close(y.detach(), out[k].detach(), f"member {k} output")
        for name, p in single.named_parameters():
            if p.grad is None:
                continue
            batched = stacked.slots[name].tensor.grad.view(K, -1)[k].view_as(p)
            if p.grad.abs().max() > 1e-4:  # (BN-cancelled biases: gradients of ~0)
                _close(p.grad, batched, f"member {k} d{name}", rtol=5e-5)
        for name, b in single.named_buffers():
            batched = stacked.slots[name].member(k, K).view_as(b)
            if b.is_floating_point():
                _close(b, batched, f"member {k} {name}")
            else:
                assert torch.equal(b, batched), name


@pytest.mark.parametrize(("norm", "kwargs"), MLP_NORMS, ids=[f"{n}{k}" for n, k in MLP_NORMS])
def test_mlp_members_equal_their_own_networks(norm: str, kwargs: dict) -> None:
    singles = [
        build_mlp(20, 5, width=32, depth=2, norm=norm, norm_kwargs=kwargs, seed=s) for s in range(K)
    ]
    for s, m in enumerate(singles):
        _randomize(m, s)
    x = torch.randn(K, 48, 20)
    _compare(singles, x, True, train=True)
    # The running statistics moved once for every member, by the member's own batch.
    _compare([m for m in singles], x, True, train=False)


def test_noisy_bn_members_draw_their_own_noise() -> None:
    singles = [build_mlp(20, 5, width=32, depth=2, norm="batch_noisy", seed=s) for s in range(K)]
    _compare(singles, torch.randn(K, 48, 20), True, train=True)
    vgg = [
        build_vgg((1, 8, 8), 4, width=4, depth=2, convs_per_stage=1, norm="batch_noisy", seed=s)
        for s in range(K)
    ]
    _compare(vgg, torch.randn(K, 6, 64), False, train=True)


@pytest.mark.parametrize(("norm", "kwargs"), CNN_NORMS, ids=[n for n, _ in CNN_NORMS])
@pytest.mark.parametrize("pool", ["avg", "flatten"])
def test_cnn_members_equal_their_own_networks(norm: str, kwargs: dict, pool: str) -> None:
    singles = [
        build_cnn((1, 10, 10), 4, channels=(4, 8), norm=norm, norm_kwargs=kwargs, pool=pool, seed=s)
        for s in range(K)
    ]
    for s, m in enumerate(singles):
        _randomize(m, s)
    x = torch.randn(K, 6, 100)
    _compare(singles, x, False, train=True)
    _compare(singles, x, False, train=False)


def test_vgg_and_deep_linear_members() -> None:
    vgg = [build_vgg((1, 12, 12), 4, width=4, depth=3, norm="batch", seed=s) for s in range(K)]
    _compare(vgg, torch.randn(K, 8, 144), False, train=True)
    linear = [build_deep_linear(6, 6, depth=6, norm="batch", seed=s) for s in range(K)]
    _compare(linear, torch.randn(K, 40, 6), True, train=True)


def test_batched_batchnorm_is_k_batchnorm_layers_with_their_running_statistics() -> None:
    """BN of K members over K*C channels: per member the same output, input gradient,
    weight gradients and running statistics as its own BatchNorm (issue 21's check)."""
    for dims, shape in ((1, (16, 6)), (2, (8, 6, 5, 5))):
        singles = [create_norm("batch", 6, dims=dims) for _ in range(K)]
        for layer in singles:
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-1, 1)
        wide = create_norm("batch", 6 * K, dims=dims)
        with torch.no_grad():
            wide.weight.copy_(torch.cat([s.weight for s in singles]))
            wide.bias.copy_(torch.cat([s.bias for s in singles]))
        xs = [torch.randn(shape) * (k + 1) + k for k in range(K)]
        x = torch.cat(xs, dim=1).requires_grad_()
        y = wide(x)
        g = torch.randn(y.shape)
        y.backward(g)
        for k, layer in enumerate(singles):
            xk = xs[k].clone().requires_grad_()
            yk = layer(xk)
            yk.backward(g[:, 6 * k : 6 * (k + 1)])
            block = slice(6 * k, 6 * (k + 1))
            _close(yk.detach(), y[:, block].detach(), "output")
            _close(xk.grad, x.grad[:, block], "input gradient")
            _close(layer.weight.grad, wide.weight.grad[block], "weight gradient")
            _close(layer.bias.grad, wide.bias.grad[block], "bias gradient")
            _close(layer.running_mean, wide.running_mean[block], "running mean")
            _close(layer.running_var, wide.running_var[block], "running var")


@pytest.mark.parametrize(
    "build",
    [
        lambda s: build_mlp(20, 5, width=32, depth=3, seed=s),
        lambda s: build_mlp(20, 5, width=32, depth=3, norm="batch", seed=s),
        lambda s: build_mlp(20, 5, width=32, depth=2, norm="ghost_batch", seed=s),
        lambda s: build_mlp(20, 5, width=25, depth=2, norm="batch", activation="tanh", seed=s),
        lambda s: build_deep_linear(8, 8, depth=5, norm="batch", seed=s),
    ],
    ids=["mlp", "mlp-bn", "mlp-ghost", "mlp-tanh-odd-width", "deep-linear-bn"],
)
def test_a_members_numbers_do_not_depend_on_its_company(build, one_thread: None) -> None:
    """Fully connected members: bitwise the same outputs and gradients in a batch of 4,
    of 2 (in another order) or alone (with one torch thread)."""
    singles = [build(s) for s in range(4)]
    features = singles[0].hidden[0].linear.in_features
    x = torch.randn(4, 30, features)
    grad = torch.randn(4, 30, 5 if features == 20 else 8)

    def run(chosen: list[int]) -> dict[str, torch.Tensor]:
        stacked = stack_models([singles[i] for i in chosen])
        out = stacked.model(x[chosen])
        out.backward(grad[chosen])
        found = {"out": out.detach()}
        for name, slot in stacked.slots.items():
            t = slot.tensor
            if t.grad is not None:
                found[name] = t.grad.view(len(chosen), -1)
        return found

    everyone = run([0, 1, 2, 3])
    for chosen in ([2], [3, 1]):
        part = run(chosen)
        for name, value in part.items():
            assert torch.equal(everyone[name][chosen], value), name


@pytest.mark.parametrize("shape", [(3, 20, 784, 16), (3, 60, 100, 100), (3, 1000, 10, 10)])
def test_batched_linear_is_k_linears_bit_for_bit(shape: tuple[int, int, int, int]) -> None:
    """Each member's output, input, weight and bias gradients are F.linear's and its
    autograd backward's, bit for bit."""
    k, b, i, o = shape
    layer = BatchedLinear(k, i, o, bias=True)
    with torch.no_grad():
        layer.weight.normal_(0, 0.1)
        layer.bias.normal_(0, 0.1)
    x = torch.rand(k, b, i, requires_grad=True)
    grad = torch.randn(k, b, o)
    layer(x).backward(grad)
    for m in range(k):
        w = layer.weight[m].detach().clone().requires_grad_()
        bias = layer.bias[m].detach().clone().requires_grad_()
        xm = x[m].detach().clone().requires_grad_()
        y = torch.nn.functional.linear(xm, w, bias)
        y.backward(grad[m])
        assert torch.equal(y, layer(x)[m])
        assert torch.equal(xm.grad, x.grad[m])
        assert torch.equal(w.grad, layer.weight.grad[m])
        assert torch.equal(bias.grad, layer.bias.grad[m])


def test_batched_linear_and_conv_shapes_and_errors() -> None:
    layer = BatchedLinear(2, 3, 4, bias=True)
    with pytest.raises(RuntimeError, match=r"expects \(K=2, B, 3\)"):
        layer(torch.randn(3, 5, 3))
    conv = BatchedConv2d(nn.Conv2d(2, 3, 3, padding=1), members=4)
    assert conv.weight.shape == (12, 2, 3, 3) and conv.groups == 4
    x = torch.randn(5, 8, 6, 6)
    assert conv(x).shape == (5, 12, 6, 6)
    rows = torch.randn(4, 5, 3)
    assert torch.equal(channels_to_rows(rows_to_channels(rows), 4), rows)


def test_networks_without_a_batched_form_are_refused_with_the_reason() -> None:
    mlps = [build_mlp(20, 5, width=8, depth=2, seed=s) for s in range(2)]
    other = build_mlp(20, 5, width=16, depth=2, seed=2)
    with pytest.raises(NotBatchable, match="member 1's network differs"):
        stack_models([mlps[0], other])
    sync = [build_mlp(20, 5, width=8, depth=2, norm="sync_batch", seed=s) for s in range(2)]
    with pytest.raises(NotBatchable, match="SyncBatchNorm"):
        stack_models(sync)
    with pytest.raises(NotBatchable, match="Sequential networks have no batched form"):
        stack_models([nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))])


def test_copy_out_and_in_round_trip_every_member() -> None:
    singles = [build_mlp(20, 5, width=8, depth=2, norm="batch", seed=s) for s in range(K)]
    for s, m in enumerate(singles):
        _randomize(m, s)
    stacked = stack_models(singles)
    fresh = build_mlp(20, 5, width=8, depth=2, norm="batch", seed=99)
    for k, single in enumerate(singles):
        stacked.copy_out(k, fresh)
        got = fresh.state_dict()
        for name, value in single.state_dict().items():
            assert torch.equal(value, got[name]), name
    with torch.no_grad():
        fresh.head.weight.fill_(7.0)
    stacked.copy_in(1, fresh)
    assert (stacked.slots["head.weight"].member(1, K) == 7).all()
    assert not (stacked.slots["head.weight"].member(0, K) == 7).any()
