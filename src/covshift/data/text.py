"""Byte-level text for language models: :class:`TextDataset`, windows of a byte stream.

A text corpus is a list of documents (books), each a byte string. The documents are
split into a training and a test (validation) split *by document*, so that no test
byte comes from a document seen in training; each split is the concatenation of its
documents. The symbols are the 256 byte values: no tokenizer, nothing to download.

An example is a window of ``context`` bytes and its targets, the same window shifted
by one byte (next-byte prediction):

- training windows start at *every* byte offset of the training stream, ``x_n =
  s[n : n + T]``, ``y_n = s[n + 1 : n + T + 1]``; they are views of the one stream
  (``Tensor.unfold``, no copy), so a batch of random rows is nanoGPT's batch of
  random offsets, drawn without replacement by :class:`~covshift.data.BatchSampler`;
- test windows tile the test stream without overlap (every test byte but the first is
  predicted exactly once), in a fixed shuffled order so that the first ``n`` windows
  (``test_examples``, the probe batch) are a sample of every test document, not the
  start of the first one.

The loss of a byte-level model is reported in bits per byte (cross-entropy in nats
divided by ln 2). Its baseline is :attr:`TextDataset.unigram_bits`: the cross-entropy
of the test bytes under the training split's byte frequencies, the loss of the best
model that ignores context. A language model counts as trained only when its test
loss is clearly below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from covshift.data.dataset import Dataset, DatasetError

__all__ = ["VOCAB_SIZE", "TextDataset", "is_text", "make_text_dataset", "unigram_bits"]

VOCAB_SIZE = 256  # byte values
_TEST_ORDER_SEED = 0  # the fixed shuffle of the test windows (not a run's seed)


@dataclass(frozen=True)
class TextDataset(Dataset):
    """A byte-level text dataset: :class:`Dataset`'s fields hold windows (see the
    module docstring), and these say where they come from.

    Attributes:
        context: bytes per window ``T`` (``x_train`` is ``(N, T)`` int64).
        unigram_bits: the test split's cross-entropy in bits per byte under the
            training split's byte frequencies (add-one smoothed over the 256 values):
            the loss a model reaches without using any context.
        train_stream, test_stream: the two splits as ``(L,)`` int64 byte streams.
        train_documents, test_documents: the documents (names) in each split.
    """

    context: int = 0
    unigram_bits: float = math.nan
    train_stream: torch.Tensor | None = None
    test_stream: torch.Tensor | None = None
    train_documents: tuple[str, ...] = ()
    test_documents: tuple[str, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.num_classes

    def to(self, device: torch.device | str) -> TextDataset:
        """The same dataset on ``device``: the streams are moved and the training
        windows made again as views (moving the views themselves would copy every
        overlapping window)."""
        assert self.train_stream is not None and self.test_stream is not None
        stream = self.train_stream.to(device)
        x_train, y_train = _train_windows(stream, self.context)
        return replace(
            self,
            x_train=x_train,
            y_train=y_train,
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            train_stream=stream,
            test_stream=self.test_stream.to(device),
        )

    def first_test(self, n: int | None) -> TextDataset:
        """The same dataset with only the first ``n`` test windows (a sample of every
        test document: the windows are in a shuffled order)."""
        if n is None or n >= len(self.x_test):
            return self
        return replace(
            self,
            x_test=self.x_test[:n],
            y_test=self.y_test[:n],
            source=f"{self.source}, first {n} test windows",
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickled as its streams: the training windows are overlapping views of the
        # stream, and pickling them would write every window out (T times the bytes).
        fields = {
            k: getattr(self, k)
            for k in (
                "name",
                "context",
                "unigram_bits",
                "train_stream",
                "test_stream",
                "train_documents",
                "test_documents",
                "source",
            )
        }
        return (_rebuild, (fields, self.x_test, self.y_test))


def _rebuild(fields: dict[str, Any], x_test: torch.Tensor, y_test: torch.Tensor) -> TextDataset:
    x_train, y_train = _train_windows(fields["train_stream"], fields["context"])
    return TextDataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=VOCAB_SIZE,
        image_shape=None,
        **fields,
    )


def is_text(data: Dataset) -> bool:
    """Whether ``data`` is byte-level text (its examples are windows of next-byte
    targets, its loss is also reported in bits per byte)."""
    return isinstance(data, TextDataset)


def _train_windows(stream: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows at every offset, as views: ``x[n] = s[n:n+T]``, ``y[n] = s[n+1:n+T+1]``."""
    return stream[:-1].unfold(0, context, 1), stream[1:].unfold(0, context, 1)


def _test_windows(stream: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows in a fixed shuffled order (copies, ``(M, T)``)."""
    count = (len(stream) - 1) // context
    starts = torch.arange(count) * context
    order = torch.randperm(count, generator=torch.Generator().manual_seed(_TEST_ORDER_SEED))
    offsets = starts[order].unsqueeze(1) + torch.arange(context)  # (M, T)
    return stream[offsets], stream[offsets + 1]


def unigram_bits(train: torch.Tensor, test: torch.Tensor) -> float:
    """Cross-entropy in bits per byte of ``test`` under the byte frequencies of
    ``train``, add-one smoothed: ``-(1/|test|) sum_b c_test(b) log2 p(b)`` with
    ``p(b) = (c_train(b) + 1) / (|train| + 256)``."""
    c_train = torch.bincount(train, minlength=VOCAB_SIZE).double()
    c_test = torch.bincount(test, minlength=VOCAB_SIZE).double()
    p = (c_train + 1) / (c_train.sum() + VOCAB_SIZE)
    return float(-(c_test * p.log2()).sum() / c_test.sum())


def _stream(documents: Sequence[bytes]) -> torch.Tensor:
    raw = b"".join(documents)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)


def make_text_dataset(
    name: str,
    documents: Sequence[tuple[str, bytes]],
    is_test: Sequence[bool],
    context: int,
    source: str,
) -> TextDataset:
    """A :class:`TextDataset` of ``documents`` (name, bytes), the ones marked in
    ``is_test`` making the test split.

    Raises:
        ValueError: ``context`` is not a positive integer.
        DatasetError: a split is too short for one window of ``context`` bytes.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"{name}: context must be a positive integer (bytes), got {context!r}")
    train_docs = [d for d, test in zip(documents, is_test, strict=True) if not test]
    test_docs = [d for d, test in zip(documents, is_test, strict=True) if test]
    train = _stream([text for _, text in train_docs])
    test = _stream([text for _, text in test_docs])
    for split, stream in (("training", train), ("test", test)):
        if len(stream) < context + 1:
            raise DatasetError(
                f"{name}: the {split} split has {len(stream)} bytes, fewer than one window "
                f"of context + 1 = {context + 1}; use a shorter context or more text"
            )
    x_train, y_train = _train_windows(train, context)
    x_test, y_test = _test_windows(test, context)
    return TextDataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=VOCAB_SIZE,
        image_shape=None,
        source=source,
        context=context,
        unigram_bits=unigram_bits(train, test),
        train_stream=train,
        test_stream=test,
        train_documents=tuple(n for n, _ in train_docs),
        test_documents=tuple(n for n, _ in test_docs),
    )
