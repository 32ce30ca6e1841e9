"""Probe batches as Hugging Face passes them (dicts of keyword arguments, (args,
kwargs)), and the errors for batches that do not fit: token ids outside the
vocabulary, one image without its batch dimension, tensors that disagree on N, and a
forward that raises ValueError rather than RuntimeError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from covshift.probe import ShiftProbe
from covshift.probe.batch import ProbeBatch, ProbeBatchError


class TinyLM(nn.Module):
    """A keyword-argument forward like a Hugging Face model's."""

    def __init__(self, vocab: int = 50, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if attention_mask is None:
            raise ValueError("You have to specify attention_mask")
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.act(self.fc(h)).mean(1)


def _ids(n: int = 6, t: int = 5, high: int = 50) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, high, (n, t), generator=gen),
        "attention_mask": torch.ones(n, t),
    }


@pytest.mark.parametrize("form", ["dict", "args_kwargs"])
def test_dict_and_args_kwargs_batches_give_the_records_of_the_direct_call(form: str) -> None:
    torch.manual_seed(0)
    net = TinyLM().eval()
    batch = _ids()
    given = (
        batch
        if form == "dict"
        else ((batch["input_ids"],), {"attention_mask": batch["attention_mask"]})
    )
    probe = ShiftProbe(net, ["act"], given, every=1, background=False, unit_dim=-1)
    (record,) = probe.record_now(0)
    with torch.no_grad():
        pre = net.fc(net.embed(batch["input_ids"]) * batch["attention_mask"].unsqueeze(-1))
    expected = pre.reshape(-1, pre.shape[-1]).double().mean(0).numpy()
    np.testing.assert_allclose(record.stats["mean"], expected, rtol=1e-6, atol=1e-7)
    assert probe.probe_input is batch["input_ids"]


def test_token_ids_outside_the_vocabulary_are_explained() -> None:
    probe = ShiftProbe(TinyLM(vocab=50), ["act"], _ids(high=80), every=1, background=False)
    with pytest.raises(
        ProbeBatchError,
        match=r"module 'embed'.*ids it received run from \d+ to 7\d.*vocabulary is \[0, 50\)",
    ):
        probe.record_now(0)


def test_a_forward_that_raises_value_error_is_explained() -> None:
    batch = {"input_ids": _ids()["input_ids"]}  # no attention_mask
    probe = ShiftProbe(TinyLM(), ["act"], batch, every=1, background=False)
    with pytest.raises(ProbeBatchError, match=r"ValueError: You have to specify attention_mask"):
        probe.record_now(0)


def test_one_image_without_its_batch_dimension_is_an_error_not_wrong_statistics() -> None:
    # Conv2d takes (3, 32, 32) as one unbatched image: its output (8, 30, 30) would be
    # read as 8 examples.
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(0))
    probe = ShiftProbe(net, ["1"], torch.randn(3, 32, 32), every=1, background=False)
    with pytest.raises(
        ProbeBatchError, match=r"shape \(8, 30, 30\), but the probe batch has N = 3.*unsqueeze\(0\)"
    ):
        probe.record_now(0)


def test_tensors_must_agree_on_n() -> None:
    bad = {"input_ids": torch.zeros(6, 5, dtype=torch.long), "attention_mask": torch.ones(4, 5)}
    with pytest.raises(ProbeBatchError, match=r"disagree on the batch size.*\(6, 5\).*\(4, 5\)"):
        ShiftProbe(TinyLM(), ["act"], bad)
    with pytest.raises(ProbeBatchError, match="a dict of keyword arguments"):
        ProbeBatch.of(3.0)
    assert ProbeBatch.of(((torch.zeros(2, 1),), {})).size == 2
