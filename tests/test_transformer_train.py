"""The training loop on text: next-byte loss, bits per byte, AdamW and warm-up against
a plain PyTorch loop, evaluation per position, divergence, argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from covshift.data import BatchSampler, TextDataset, load_dataset
from covshift.models import build_transformer
from covshift.training import DivergenceGuard, TrainConfig, TrainState, evaluate, train

SMALL = dict(context=32, d_model=32, n_layer=2, n_head=2)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    # Tiny models: one thread is as fast, and on a loaded machine two OpenMP threads
    # wait on each other for seconds per step. Ours and the plain loop share it.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text() -> TextDataset:
    data = load_dataset("synthetic-text", context=32, seed=1)
    assert isinstance(data, TextDataset)
    return data


def test_trains_clearly_below_the_unigram_baseline(text: TextDataset) -> None:
    net = build_transformer(**SMALL, norm="layer")
    config = TrainConfig(
        steps=300, batch_size=16, lr=3e-3, optimizer="adamw", warmup_steps=20, eval_every=150
    )
    result = train(net, text, config, device="cpu")
    first, last = result.history[0], result.final
    assert first["test_bpb"] == pytest.approx(8.0, abs=0.1)  # uniform over 256 bytes at init
    for split in ("test", "train"):
        assert last[f"{split}_bpb"] == pytest.approx(last[f"{split}_loss"] / math.log(2))
    # clearly below the byte-frequency entropy: the model uses the context
    assert last["test_bpb"] < 0.5 * text.unigram_bits
    assert last["test_accuracy"] > 0.6
    assert result.status == "finished"


def test_adamw_with_warmup_matches_a_plain_loop(text: TextDataset) -> None:
    config = TrainConfig(
        steps=25,
        batch_size=8,
        lr=2e-3,
        optimizer="adamw",
        betas=(0.9, 0.95),
        weight_decay=0.1,
        warmup_steps=10,
        eval_every=0,
        seed=5,
    )
    ours = build_transformer(**SMALL, norm="rms", seed=2)
    train(ours, text, config, device="cpu")

    def plain_loop(fused: bool | None, steps: int = 25) -> torch.nn.Module:
        plain = build_transformer(**SMALL, norm="rms", seed=2)
        opt = torch.optim.AdamW(
            plain.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=fused
        )
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 10))
        sampler = BatchSampler(len(text.x_train), 8, seed=5)
        for _ in range(steps):
            idx = sampler.next()
            logits = plain(text.x_train[idx])
            loss = F.cross_entropy(logits.reshape(-1, 256), text.y_train[idx].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            warmup.step()
        return plain

    # ours is torch's fused AdamW, to the bit ...
    fused = plain_loop(True)
    for (name, a), b in zip(ours.state_dict().items(), fused.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # ... which makes the update of torch's reference per-tensor AdamW: after one step
    # to float rounding; after 25, within 1% of a step (lr 2e-3), as Adam's division by
    # the root of near-zero second moments lets rounding grow
    for steps, atol in ((1, 1e-7), (25, 2e-5)):
        got, want = plain_loop(True, steps).state_dict(), plain_loop(None, steps).state_dict()
        for name, value in got.items():
            torch.testing.assert_close(value, want[name], rtol=0, atol=atol, msg=name)


def test_warmup_schedule_seen_by_a_callback(text: TextDataset) -> None:
    rates: list[float] = []

    class Watch:
        def on_step_end(self, state: TrainState) -> None:
            rates.append(state.optimizer.param_groups[0]["lr"])

    config = TrainConfig(steps=6, batch_size=4, lr=0.4, warmup_steps=4, eval_every=0)
    train(build_transformer(**SMALL), text, config, callbacks=[Watch()], device="cpu")
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_evaluate_is_per_position(text: TextDataset) -> None:
    net = build_transformer(**SMALL, norm="batch").eval()
    x, y = text.x_test[:20], text.y_test[:20]
    with torch.no_grad():
        logits = net(x)  # (20, 32, 256)
    expected_loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)).item()
    expected_acc = (logits.argmax(-1) == y).double().mean().item()
    for chunk in (32, 100, 10_000):  # positions per chunk: whole windows at a time
        got = evaluate(net, x, y, chunk=chunk)
        assert got["test_loss"] == pytest.approx(expected_loss, rel=1e-6)
        assert got["test_accuracy"] == pytest.approx(expected_acc)


def test_divergence_is_detected_on_text(text: TextDataset) -> None:
    net = build_transformer(**SMALL, norm="none", init="unit")
    config = TrainConfig(steps=200, batch_size=8, lr=50.0, eval_every=20)
    result = train(net, text, config, callbacks=[DivergenceGuard()], device="cpu")
    assert result.status == "diverged" and result.outcome_step == 20
    assert result.steps == 20  # stopped there


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "adamw", "momentum": 0.9}, "momentum is SGD's; adamw has betas"),
        ({"optimizer": "adam"}, "optimizer must be one of sgd, adamw"),
        ({"optimizer": "adamw", "betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ],
)
def test_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(steps=10, **kwargs)


def test_adamw_is_fused_where_torch_fuses_it() -> None:
    from covshift.optimizers import make_optimizer

    params = list(build_transformer(**SMALL).parameters())
    assert make_optimizer(params, "adamw", lr=1e-3).defaults["fused"] is True
    groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]
    assert make_optimizer(groups, "adamw", lr=1e-3).defaults["fused"] is True
    sgd = make_optimizer(params, "sgd", lr=0.1)  # the loop MemberSGD equals, to the bit
    assert not sgd.defaults.get("fused")
