"""Hugging Face models built from configs (no weights), as issue 10 checks them: fold and
convert keep the outputs, the probe's units are the model's features, dict batches
work, and a bad probe batch gets an explaining error."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import covshift.nn as cn  # noqa: E402
from covshift.nn import fold_batchnorm_with_report  # noqa: E402
from covshift.probe import ShiftProbe  # noqa: E402
from covshift.probe.batch import ProbeBatchError  # noqa: E402


def _resnet() -> torch.nn.Module:
    config = transformers.ResNetConfig(
        depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, layer_type="basic", num_labels=3
    )
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config)
    model.train()
    with torch.no_grad():  # running statistics away from their initial 0 / 1
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32) * 2 + 1)
    return model.eval()


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2Model(config).eval()


def test_resnet_folds_and_converts_with_its_outputs_kept() -> None:
    model = _resnet()
    x = torch.randn(4, 3, 32, 32)
    reference = model(x).logits
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    folded, report = fold_batchnorm_with_report(model, check_input=x)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 0
    assert len(str(report).splitlines()) == norms  # one line per folded norm
    torch.testing.assert_close(folded(x).logits, reference, atol=1e-5, rtol=1e-5)
    converted = cn.convert(copy.deepcopy(model), "covshift")
    assert sum(cn.norm_kind(m) == "batch" for m in converted.modules()) == norms
    # covshift's BatchNorm2d is a torch.nn.BatchNorm2d, with covshift's forward
    assert sum(type(m) is cn.BatchNorm2d for m in converted.modules()) == norms
    assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
    torch.testing.assert_close(converted(x).logits, reference, atol=1e-6, rtol=1e-6)
    back = cn.convert(converted, "torch")
    torch.testing.assert_close(back(x).logits, reference, atol=1e-6, rtol=1e-6)


def test_resnet_units_are_channels() -> None:
    model = _resnet()
    probe = ShiftProbe(model, "auto", torch.randn(6, 3, 32, 32))
    with probe:
        probe.record_now(0)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    by_layer = {r.layer: r for r in probe.records}
    assert set(convs) <= set(by_layer)
    for name, norm in convs.items():
        record = by_layer[name]
        assert record.unit_axis.dim == 1 and record.unit_axis.source == "layer"
        assert record.stats["mean"].shape == (norm.num_features,)


def test_gpt2_units_are_features_on_a_dict_batch() -> None:
    model = _gpt2()
    ids = torch.randint(0, 50, (4, 8))
    mask = torch.ones(4, 8, dtype=torch.long)
    probe = ShiftProbe(model, "auto", {"input_ids": ids, "attention_mask": mask})
    with probe:
        probe.record_now(0)
    by_layer = {r.layer: r for r in probe.records}
    # hidden states (4, 8, 16): units on the last axis, never the 8 token positions
    ln = by_layer["h.0.ln_1"]
    assert ln.unit_axis.dim == 2 and ln.stats["mean"].shape == (16,)
    # the ground truth: the input of h.0.ln_1 is the embeddings' sum
    with torch.no_grad():
        captured = {}
        handle = model.h[0].ln_1.register_forward_pre_hook(
            lambda m, a: captured.setdefault("x", a[0])
        )
        model(input_ids=ids, attention_mask=mask)
        handle.remove()
    expected = captured["x"].reshape(-1, 16).mean(0)
    torch.testing.assert_close(
        torch.as_tensor(ln.stats["mean"]),
        expected.to(torch.as_tensor(ln.stats["mean"]).dtype),
        atol=1e-5,
        rtol=1e-5,
    )
    act = by_layer["h.0.mlp.act"]
    assert act.unit_axis.dim == 2 and act.stats["mean"].shape == (64,)  # 4 x n_embd


def test_gpt2_token_ids_outside_the_vocabulary_are_explained() -> None:
    model = _gpt2()
    probe = ShiftProbe(model, "auto", {"input_ids": torch.full((2, 4), 500)})
    with (
        pytest.raises(
            ProbeBatchError,
            match=r"module 'wte' .* run from 500 to 500, and its "
            r"vocabulary is \[0, 50\)",
        ),
        probe,
    ):
        probe.record_now(0)
