"""The Hugging Face TrainerCallback, on a real Trainer and tiny config-built models
(no weights, no download): the schedule in optimizer steps, the recorded statistics
against a plain forward hook, TensorBoard's event files, the store, the hooks, a
failure inside training, and the ranks other than 0."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)

from covshift.integrations._trainer_objects import unwrap_optimizer  # noqa: E402
from covshift.integrations.huggingface import ShiftProbeCallback, model_loss  # noqa: E402
from covshift.probe import gradient_ics  # noqa: E402
from covshift.store import Store  # noqa: E402

LAYER = "transformer.h.1.ln_2"  # a LayerNorm: its input is the residual stream (N, T, E)
VOCAB, SEQ = 50, 8


class TokenData(torch.utils.data.Dataset):
    """Random token sequences, a causal LM's batch: dicts of input_ids, mask, labels."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=SEQ,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def arguments(out: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 5e-2,
        "logging_steps": 2,
        "report_to": ["tensorboard"],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


class Forwards(TrainerCallback):
    """Counts the model's training forwards, and keeps the first batch it was given."""

    def __init__(self) -> None:
        self.count = 0
        self.first: dict[str, torch.Tensor] | None = None
        self.handle: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if module is model and module.training:  # not a copy (gradient ICS's)
                self.count += 1
                if self.first is None:
                    self.first = {
                        k: v.clone() for k, v in kwargs.items() if k != "num_items_in_batch"
                    }

        self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, *args: Any, **kw: Any) -> None:
        self.handle.remove()


class Checker(TrainerCallback):
    """At every due step, the statistics of LAYER's input on the probe batch from a
    plain forward hook, and gradient ICS computed directly."""

    def __init__(self, batch: dict[str, torch.Tensor], every: int, plain_stats: Any) -> None:
        self.batch, self.every, self.plain_stats = batch, every, plain_stats
        self.stats: dict[int, dict[str, np.ndarray]] = {}
        self.ics: dict[int, dict[str, Any]] = {}

    def measure(self, state: Any, model: Any, optimizer: Any) -> None:
        step = state.global_step
        if step % self.every:
            return
        self.stats[step] = self.plain_stats(model, LAYER, lambda m: m(**self.batch), -1)
        self.ics[step] = gradient_ics(
            model, unwrap_optimizer(optimizer), self.batch, None, loss_fn=model_loss
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.measure(state, kw["model"], kw["optimizer"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.measure(state, kw["model"], kw["optimizer"])


def by_step(records: list, layer: str) -> dict[int, dict[str, np.ndarray]]:
    return {r.step: r.stats for r in records if r.layer == layer}


def test_given_probe_batch_schedule_values_tensorboard_store(
    tmp_path: Path, plain_stats: Any, hookless: Any
) -> None:
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model = gpt2()
    data = TokenData()
    probe = {k: torch.stack([data[i][k] for i in range(6)]) for k in data[0]}
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=data)
    forwards = Forwards()
    callback = ShiftProbeCallback(
        trainer, probe_input=probe, every=2, grad_ics=True, store=tmp_path / "covshift.db"
    )
    checker = Checker(probe, 2, plain_stats)
    for c in (forwards, callback, checker):
        trainer.add_callback(c)
    with callback:
        trainer.train()

    # The schedule: optimizer steps 0, 2, 4, 6 of 6, with 2 micro-batches per step.
    assert forwards.count == 12
    steps = sorted({r.step for r in callback.records})
    assert steps == [0, 2, 4, 6]
    watched = sorted({r.layer for r in callback.records if "mean" in r.stats})
    assert LAYER in watched and "transformer.h.0.mlp.act" in watched

    # The values: equal to a plain hook's on the same batch at the same step.
    recorded = by_step(callback.records, LAYER)
    assert sorted(recorded) == sorted(checker.stats) == steps
    for step in steps:
        for key in ("mean", "std", "pooled_mean", "pooled_std"):
            np.testing.assert_allclose(
                recorded[step][key], checker.stats[step][key], rtol=1e-5, atol=1e-7
            )
    assert not np.allclose(recorded[0]["mean"], recorded[6]["mean"])  # training moved them
    for step in steps:  # gradient ICS: that of the trainer's optimizer, at that step
        for layer, ics in checker.ics[step].items():
            got = by_step(callback.records, layer)[step]
            assert float(got["grad_ics_l2"]) == pytest.approx(ics.l2, rel=1e-5, abs=1e-9)
            assert float(got["grad_ics_cos"]) == pytest.approx(ics.cos, rel=1e-6)

    # TensorBoard (the Trainer's reporting callback) received them at their steps,
    # and the Trainer's own loss log was not swallowed.
    events_dir = next(tmp_path.glob("**/events.out.tfevents.*")).parent
    events = ea.EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars(f"train/covshift/{LAYER}/pooled_mean")
    assert [s.step for s in scalars] == steps
    np.testing.assert_allclose(
        [s.value for s in scalars], [float(recorded[s]["pooled_mean"]) for s in steps], rtol=1e-6
    )
    assert [s.step for s in events.Scalars(f"train/covshift/{LAYER}/shift/w1")] == steps
    assert [s.step for s in events.Scalars("train/loss")] == [2, 4, 6]
    assert "covshift/transformer.h.0.attn.c_attn/grad_ics_cos" in trainer.state.log_history[0]

    # The store: the run, its records at the schedule's steps, the Trainer's loss.
    with Store(tmp_path / "covshift.db", create=False) as store:
        run = store.run(callback.run_id)
        assert run.status == "finished" and run.seed == 0
        assert run.config["model"] == "GPT2LMHeadModel"
        assert run.config["probe"]["probe_input"] == "given"
        got_steps, means = store.probe(run.id, LAYER, "mean")
        assert got_steps.tolist() == steps
        np.testing.assert_allclose(means[-1], recorded[6]["mean"])
        assert store.scalars(run.id, "loss")[0].tolist() == [2, 4, 6]

    assert hookless(model)


def test_first_training_batch_and_another_architecture(
    tmp_path: Path, plain_stats: Any, hookless: Any
) -> None:
    """No probe batch given: the first batch the model received, cut to probe_size,
    recorded at the initial weights; a BERT classifier (its pooler's (N, E) Tanh too)."""
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        num_labels=3,
    )
    model = BertForSequenceClassification(config)
    initial = copy.deepcopy(model)

    class Labelled(TokenData):
        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            item = super().__getitem__(i)
            return {**item, "labels": item["input_ids"][0] % 3}

    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, gradient_accumulation_steps=1, report_to=[]),
        train_dataset=Labelled(),
    )
    forwards = Forwards()
    callback = ShiftProbeCallback(trainer, layers="auto", probe_size=3, every=3)
    trainer.add_callback(forwards)
    trainer.add_callback(callback)
    trainer.train()

    assert sorted({r.step for r in callback.records}) == [0, 3, 6]
    layers = {r.layer for r in callback.records}
    assert {
        "bert.encoder.layer.0.intermediate.intermediate_act_fn",
        "bert.pooler.activation",
    } <= layers
    first = {k: v[:3] for k, v in forwards.first.items()}
    layer = "bert.encoder.layer.1.output.LayerNorm"
    expected = plain_stats(initial, layer, lambda m: m(**first), -1)
    got = by_step(callback.records, layer)[0]
    np.testing.assert_allclose(got["mean"], expected["mean"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["std"], expected["std"], rtol=1e-5, atol=1e-7)
    assert int(got["count"]) == 3 * SEQ  # N * T values per unit: units along E
    # Summaries went to the trainer's log history (no reporting callback was asked for).
    assert any(f"covshift/{layer}/pooled_std" in entry for entry in trainer.state.log_history)
    assert hookless(model)


class Boom(TrainerCallback):
    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == 3:
            raise RuntimeError("boom at step 3")


def test_exception_in_training_closes_the_run_failed(tmp_path: Path, hookless: Any) -> None:
    model = gpt2()
    trainer = Trainer(
        model=model, args=arguments(tmp_path, report_to=[]), train_dataset=TokenData()
    )
    # Live batches, every step: a capture is armed when the exception comes.
    callback = ShiftProbeCallback(trainer, source="train", every=1, store=tmp_path / "c.db")
    trainer.add_callback(callback)
    trainer.add_callback(Boom())
    with pytest.raises(RuntimeError, match="boom"), callback:
        trainer.train()
    with Store(tmp_path / "c.db", create=False) as store:
        run = store.run(callback.run_id)
        assert run.status == "failed" and "boom at step 3" in run.error
        assert store.probe(run.id, LAYER, "mean")[0].tolist() == [0, 1, 2]
    assert hookless(model)

    # Without the context manager, the next train() closes the run left open.
    trainer.remove_callback(Boom)
    trainer.remove_callback(callback)
    plain = ShiftProbeCallback(trainer, every=3, store=tmp_path / "c.db")
    trainer.add_callback(plain)
    trainer.add_callback(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    left_open = plain.run_id
    trainer.remove_callback(Boom)
    trainer.train()
    with Store(tmp_path / "c.db", create=False) as store:
        assert store.run(left_open).status == "failed"
        assert store.run(plain.run_id).status == "finished"
    assert hookless(model)


def test_ranks_other_than_zero_do_nothing(tmp_path: Path, hookless: Any) -> None:
    model = gpt2()
    callback = ShiftProbeCallback(every=1, store=tmp_path / "c.db")
    state = TrainerState(is_world_process_zero=False)
    args = arguments(tmp_path, report_to=[])
    control = transformers.TrainerControl()
    callback.on_train_begin(args, state, control, model=model, optimizer=None)
    model.train()
    model(input_ids=TokenData().ids[:2])  # a training forward: nothing catches it
    state.global_step = 1
    callback.on_step_end(args, state, control, optimizer=None)
    callback.on_train_end(args, state, control)
    assert callback.records == [] and callback.run_id is None
    assert not (tmp_path / "c.db").exists()
    assert hookless(model)
