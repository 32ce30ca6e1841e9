"""ShiftProbe on real models: builder MLPs and CNNs, a transformer block, shared
modules, output mode with saturation, live training batches, CUDA, memory."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.data import Dataset
from covshift.models import build_cnn, build_mlp
from covshift.probe import ShiftProbe
from covshift.probe.saturation import tail_threshold
from covshift.training import TrainConfig, train


def check_stats(stats: dict[str, np.ndarray], values: np.ndarray, levels=(0.15, 0.5, 0.85)) -> None:
    """``values`` is (M, U): the record must describe exactly these numbers."""
    v = values.astype(np.float64)
    np.testing.assert_allclose(stats["mean"], v.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["std"], v.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        stats["quantiles"], np.quantile(v, levels, axis=0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(stats["hist"], np.histogram(values, bins=stats["hist_edges"])[0])
    assert stats["count"] == len(v)


class Capture:
    """The do-it-yourself reference: keep every tensor a module receives."""

    def __init__(self, module: nn.Module, output: bool = False) -> None:
        self.seen: list[torch.Tensor] = []
        if output:
            self.handle = module.register_forward_hook(
                lambda m, a, out: self.seen.append(
                    (out[0] if isinstance(out, tuple) else out).detach().clone()
                )
            )
        else:
            self.handle = module.register_forward_pre_hook(
                lambda m, a: self.seen.append(a[0].detach().clone())
            )


@pytest.mark.parametrize("placement", ["before", "after"])
def test_output_mode_saturation_follows_the_activation(placement: str) -> None:
    torch.manual_seed(0)
    net = build_mlp(10, 2, width=6, depth=2, norm="batch", norm_position=placement, init_std=2.0)
    net(torch.randn(64, 10))  # non-trivial running stats
    x = torch.randn(80, 10) * 3
    feeder = "norm" if placement == "before" else "linear"  # the module right before act
    other = "linear" if placement == "before" else "act"
    probe = ShiftProbe(net, [f"hidden.*.{feeder}", f"hidden.*.{other}"], x, record="output")
    refs = {n: Capture(m, output=True) for n, m in net.named_modules() if n.startswith("hidden.")}
    records = {r.layer: r for r in probe.record_now(0)}
    t = tail_threshold("sigmoid", 0.05)
    for i in range(2):
        rec = records[f"hidden.{i}.{feeder}"]
        values = refs[f"hidden.{i}.{feeder}"].seen[-1].numpy()
        assert rec.activation == "sigmoid"
        check_stats(rec.stats, values)
        np.testing.assert_allclose(rec.stats["saturation"], (np.abs(values) > t).mean(0), rtol=1e-6)
        # The other module's output does not enter the sigmoid directly: no saturation.
        assert records[f"hidden.{i}.{other}"].activation is None
        assert "saturation" not in records[f"hidden.{i}.{other}"].stats


def test_cnn_relu_saturation_in_input_mode() -> None:
    net = build_cnn((1, 8, 8), 3, channels=(4, 6), norm="batch")
    x = torch.randn(10, 64)
    refs = {n: Capture(m) for n, m in net.named_modules() if n.endswith(".act")}
    records = {r.layer: r for r in ShiftProbe(net, "auto:act", x).record_now(3)}
    for name, ref in refs.items():
        h = ref.seen[-1]  # (N, C, H, W)
        values = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).numpy()
        check_stats(records[name].stats, values)
        np.testing.assert_allclose(records[name].stats["saturation"], (values < 0).mean(0))
        assert records[name].activation == "relu"


class Block(nn.Module):
    """A pre-norm transformer block: LayerNorm, self-attention (tuple output), GELU MLP."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, E)
        h = self.ln1(x)
        x = x + self.attn(query=h, key=h, value=h, need_weights=True)[0]  # keyword call
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


def test_transformer_block() -> None:
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(5, 7, 8)
    auto = {r.layer: r for r in ShiftProbe(block, "auto", x, unit_dim=-1).record_now(0)}
    assert list(auto) == ["ln1", "ln2", "act"]
    check_stats(auto["ln1"].stats, x.reshape(-1, 8).numpy())  # the block's input, per feature
    attn_out = Capture(block.attn, output=True)
    attn_in = ShiftProbe(block, ["attn"], x, unit_dim=-1).record_now(0)[0]
    (attn,) = ShiftProbe(block, ["attn"], x, unit_dim=-1, record="output").record_now(0)
    # The output is (attn_output, attn_weights): the attention output is recorded.
    check_stats(attn.stats, attn_out.seen[-1].reshape(-1, 8).numpy())
    with torch.no_grad():
        query = block.ln1(x)  # passed as a keyword argument: still found
    check_stats(attn_in.stats, query.reshape(-1, 8).numpy())
    linear = [r.layer for r in ShiftProbe(block, "auto:linear", x, unit_dim=-1).record_now(0)]
    assert linear == ["fc1", "fc2"]  # attn.out_proj is never called as a module: skipped


def test_shared_module_calls_are_recorded_separately() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.act = nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(self.act(self.shared(x)))

    net = Twice()
    x = torch.randn(30, 4)
    ref = Capture(net.shared)
    records = {r.layer: r for r in ShiftProbe(net, ["shared", "act"], x).record_now(0)}
    assert set(records) == {"shared", "shared#1", "act"}
    check_stats(records["shared"].stats, ref.seen[0].numpy())
    check_stats(records["shared#1"].stats, ref.seen[1].numpy())


def test_probe_batch_runs_in_eval_mode_without_side_effects() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU())
    net(torch.randn(32, 5) + 2)
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(40, 5)
    rng = torch.get_rng_state()
    (rec,) = ShiftProbe(net, ["3"], x).record_now(0)
    assert net.training  # mode restored
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())  # dropout off: no random draws
    net.eval()
    with torch.no_grad():
        expected = net[1](net[0](x)).numpy()  # running statistics, dropout off
    check_stats(rec.stats, expected)


def test_wrong_probe_batch_names_the_expected_shape() -> None:
    net = build_mlp(10, 2, width=4, depth=1)
    probe = ShiftProbe(net, ["hidden.0.act"], torch.randn(8, 11))
    with pytest.raises(
        RuntimeError, match=r"'hidden.0.linear'.*expects input of shape \(N, ..., 10\)"
    ):
        probe.record_now(0)
    cnn = build_cnn((3, 8, 8), 2, channels=(4,))
    with pytest.raises(RuntimeError, match=r"first layer 'features.0.linear'.*\(N, 3, H, W\)"):
        ShiftProbe(cnn, "auto", torch.randn(8, 1, 8, 8)).check()
    with pytest.raises(ValueError, match="N >= 2 examples"):
        ShiftProbe(net, "auto", torch.randn(1, 10))
    with pytest.raises(ValueError, match="probe_input is needed with source='probe'"):
        ShiftProbe(net, "auto")
    with pytest.raises(ValueError, match="probe_input must be None with source='train'"):
        ShiftProbe(net, "auto", torch.randn(8, 10), source="train")


# -- live training batches ------------------------------------------------------------


def test_live_batches_in_covshift_train(small_data: Dataset) -> None:
    config = TrainConfig(steps=9, batch_size=32, lr=0.1, eval_every=4, seed=0)
    ref_net = build_mlp(784, 10, width=8, depth=2, norm="batch", seed=0)
    refs = {i: Capture(ref_net.hidden[i].act) for i in range(2)}
    train(ref_net, small_data, config, device="cpu")
    net = build_mlp(784, 10, width=8, depth=2, norm="batch", seed=0)
    probe = ShiftProbe(net, "hidden.*.act", source="train", every=2)
    with probe:
        train(net, small_data, config, callbacks=[probe], device="cpu")
    # Records at steps 0, 2, 4, 6, 8: step s is the training forward of step s + 1 (with
    # the weights after s updates); evaluations (steps 0, 4, 8) are not mistaken for it.
    # The reference saw training AND evaluation forwards: pick the training ones (batch 32).
    train_forwards = {i: [t for t in refs[i].seen if t.shape[0] == 32] for i in refs}
    assert len(train_forwards[0]) == 9
    assert sorted({r.step for r in probe.records}) == [0, 2, 4, 6, 8]
    for r in probe.records:
        i = int(r.layer.split(".")[1])
        check_stats(r.stats, train_forwards[i][r.step].numpy())
    # Probing changed nothing in training.
    assert all(
        torch.equal(a, b)
        for a, b in zip(net.state_dict().values(), ref_net.state_dict().values(), strict=True)
    )
    for module in net.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_live_batches_in_your_own_loop() -> None:
    torch.manual_seed(0)
    net = build_cnn((1, 6, 6), 3, channels=(4,), norm="batch")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ref = Capture(net.features[0].act)
    probe = ShiftProbe(net, "auto:act", source="train", steps=[0, 3])
    batches = [torch.randn(16, 36) for _ in range(6)]
    with probe:
        probe.maybe_record(0)
        for step, x in enumerate(batches, start=1):
            loss = F.cross_entropy(net(x), torch.zeros(16, dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.maybe_record(step)
            with torch.no_grad():
                net.eval()
                net(x)  # an evaluation between steps is not captured
                net.train()
    assert [r.step for r in probe.records] == [0, 3]
    train_seen = ref.seen[0::2]  # training forward, then evaluation, per step
    for r in probe.records:
        h = train_seen[r.step]
        check_stats(r.stats, h.permute(0, 2, 3, 1).reshape(-1, 4).numpy())
    with pytest.raises(RuntimeError, match="record_now needs a probe batch"):
        probe.record_now(0)


def test_hooks_removed_when_the_loop_fails() -> None:
    net = build_mlp(10, 2, width=4, depth=1)
    probe = ShiftProbe(net, "auto", source="train", every=1)
    with pytest.raises(KeyboardInterrupt), probe:
        probe.maybe_record(0)  # armed
        assert net.hidden[0].act._forward_pre_hooks
        raise KeyboardInterrupt
    assert not net.hidden[0].act._forward_pre_hooks and not net._forward_hooks


# -- devices, memory --------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    net = build_cnn((1, 8, 8), 3, channels=(4, 8), norm="batch")
    x = torch.randn(12, 64)
    cpu = {r.layer: r.stats for r in ShiftProbe(net, "auto", x).record_now(0)}
    gpu = {r.layer: r.stats for r in ShiftProbe(net.cuda(), "auto", x).record_now(0)}
    for layer, stats in cpu.items():
        for key in ("mean", "std", "quantiles", "saturation"):
            if key in stats:
                np.testing.assert_allclose(gpu[layer][key], stats[key], rtol=1e-4, atol=1e-5)


def _live_tensors() -> tuple[int, int]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.nelement() * t.element_size() for t in tensors)


@pytest.mark.parametrize("source", ["probe", "train"])
def test_memory_stays_flat_over_many_records(source: str) -> None:
    torch.manual_seed(0)
    net = build_mlp(20, 3, width=16, depth=2, norm="batch")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x_probe = torch.randn(50, 20) if source == "probe" else None
    kept = []
    probe = ShiftProbe(net, "auto", x_probe, source=source, every=1, sink=lambda r: kept.append(0))
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))

    def run(steps: int, start: int) -> None:
        for step in range(start, start + steps):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            probe.maybe_record(step)

    with probe:
        run(5, 1)  # warm up: optimizer state, caches
        # Records still in flight in the background worker hold their tensors, and how
        # many are in flight depends on how busy the machine is: count after a flush.
        probe.flush()
        before = _live_tensors()
        run(30, 6)
        probe.flush()
        after = _live_tensors()
    assert len(kept) >= 30 * 4
    # Counted process-wide, so tensors other tests left behind may be collected in
    # between; what must not happen is growth with the number of records.
    assert after[0] <= before[0] and after[1] <= before[1]
