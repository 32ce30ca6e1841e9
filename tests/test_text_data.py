"""Byte-level text: the SWORD reader (on a module written here), the World English
Bible as Debian installs it, the synthetic text, windows, the split by document, the
unigram baseline against an independent computation, moves and pickles."""

from __future__ import annotations

import itertools
import math
import pickle
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from covshift.data import (
    DEFAULT_WEB_DIR,
    DatasetError,
    TextDataset,
    is_sequence_dataset,
    is_text,
    load_dataset,
)
from covshift.data.bible import read_sword_books
from covshift.data.text import make_text_dataset, unigram_bits


def write_ztext(folder: Path, testaments: dict[str, list[str]]) -> None:
    """A SWORD zText module: per testament, zlib blocks and their 12-byte index."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, blocks in testaments.items():
        data, index = b"", b""
        for block in blocks:
            raw = block.encode()
            packed = zlib.compress(raw)
            index += struct.pack("<III", len(data), len(packed), len(raw))
            data += packed
        (folder / f"{name}.bzz").write_bytes(data)
        (folder / f"{name}.bzs").write_bytes(index)


def book(osis_id: str, n: int, body: str) -> str:
    return (
        f'<div osisID="{osis_id}" sID="g{n}" type="book"/>{body}'
        f'<div eID="g{n}" osisID="{osis_id}" type="book"/>'
    )


OT = [
    '<milestone type="x-importer"/>',
    '<div sID="p0" type="front"/><title>Preface</title>Not a book.<div eID="p0" type="front"/>'
    + book(
        "Gen",
        1,
        '<title type="main">Genesis</title><div sID="a" type="x-p"/><chapter sID="Gen.1"/>'
        '<w lemma="strong:H1">In</w> <w>the</w> beginning, God<note placement="foot">'
        "<reference>1:1</reference>a note</note> created.<note>x</note> "
        '<l sID="l1"/>A   line<lb/>and  more.',
    ),
    book("Exod", 2, "Now these<note>n</note>are the names."),
]
NT = ["", book("Matt", 3, "The book.") + '<div type="glossary">Glossary text</div>']


def test_sword_reader_keeps_each_books_running_text(tmp_path: Path) -> None:
    write_ztext(tmp_path, {"ot": OT, "nt": NT})
    books = read_sword_books(tmp_path)
    assert [name for name, _ in books] == ["Gen", "Exod", "Matt"]
    assert books[0][1].decode() == "Genesis\nIn the beginning, God created.\nA line\nand more.\n"
    assert books[1][1] == b"Now these are the names.\n"  # a note between words: a space
    assert books[2][1] == b"The book.\n"  # the glossary and the preface are not books


def test_sword_reader_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"ot\.bzs not found; install Debian's sword-text-web"):
        read_sword_books(tmp_path)
    write_ztext(tmp_path, {"ot": OT, "nt": NT})
    (tmp_path / "nt.bzs").write_bytes(b"\x00" * 13)
    with pytest.raises(DatasetError, match=r"nt\.bzs: 13 bytes, not a whole number"):
        read_sword_books(tmp_path)
    index = struct.pack("<III", 0, len((tmp_path / "nt.bzz").read_bytes()), 999)
    (tmp_path / "nt.bzs").write_bytes(index)
    with pytest.raises(DatasetError, match=r"unpacks to .* its index says 999"):
        read_sword_books(tmp_path)
    write_ztext(tmp_path, {"ot": ["<p>no books</p>"], "nt": [""]})
    with pytest.raises(DatasetError, match="holds no book"):
        read_sword_books(tmp_path)


@pytest.fixture(scope="module")
def bible() -> TextDataset:
    data = load_dataset("world-english-bible", context=64)
    assert isinstance(data, TextDataset)
    return data


def test_world_english_bible_is_split_by_book(bible: TextDataset) -> None:
    books = read_sword_books(DEFAULT_WEB_DIR)
    assert len(books) == 81 and books[0][0] == "Gen" and books[-1][0] == "Rev"
    names = [n for n, _ in books]
    test = [names[i] for i in range(9, 81, 10)]
    assert bible.test_documents == tuple(test)
    assert set(bible.train_documents) == set(names) - set(test)
    text = dict(books)
    train_bytes = b"".join(text[n] for n in bible.train_documents)
    test_bytes = b"".join(text[n] for n in bible.test_documents)
    assert bytes(bible.train_stream.to(torch.uint8).numpy()) == train_bytes
    assert bytes(bible.test_stream.to(torch.uint8).numpy()) == test_bytes
    assert len(train_bytes) + len(test_bytes) > 4_500_000  # ~5 MB of English
    assert 0.08 < len(test_bytes) / (len(train_bytes) + len(test_bytes)) < 0.12
    assert b"In the beginning, God created the heavens and the earth." in text["Gen"]
    assert b"<" not in train_bytes + test_bytes  # no markup left
    # The baseline a trained model must beat: about 4.46 bits per byte.
    assert 4.3 < bible.unigram_bits < 4.6


def test_windows_are_next_byte_pairs(bible: TextDataset) -> None:
    t = bible.context
    s = bible.train_stream
    assert bible.x_train.shape == (len(s) - t, t) and bible.num_features == t
    for n in (0, 12345, len(bible.x_train) - 1):
        assert torch.equal(bible.x_train[n], s[n : n + t])
        assert torch.equal(bible.y_train[n], s[n + 1 : n + t + 1])
    # test windows tile the test stream (each byte but the first is a target once),
    # in a shuffled order
    m = (len(bible.test_stream) - 1) // t
    assert bible.x_test.shape == bible.y_test.shape == (m, t)
    assert torch.equal(bible.x_test[:, 1:], bible.y_test[:, :-1])
    tiled = bible.test_stream[: m * t + 1].unfold(0, t + 1, t)  # (m, t + 1) in order
    ours = torch.cat([bible.x_test, bible.y_test[:, -1:]], dim=1)
    assert not torch.equal(ours, tiled)
    assert sorted(map(tuple, ours.tolist())) == sorted(map(tuple, tiled.tolist()))


def test_unigram_bits_against_an_independent_count() -> None:
    train = b"abracadabra, the cat sat."
    test = b"a cat! zz"
    counts, total = Counter(train), len(train)
    expected = -sum(math.log2((counts[b] + 1) / (total + 256)) for b in test) / len(test)

    def stream(b: bytes) -> torch.Tensor:
        return torch.tensor(list(b), dtype=torch.int64)

    assert unigram_bits(stream(train), stream(test)) == pytest.approx(expected, rel=1e-12)


def test_synthetic_text_is_seeded_and_learnable_in_principle() -> None:
    a = load_dataset("synthetic-text", context=16, seed=3)
    b = load_dataset("synthetic-text", context=16, seed=3)
    c = load_dataset("synthetic-text", context=16, seed=4)
    assert torch.equal(a.train_stream, b.train_stream) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.train_stream[:1000], c.train_stream[:1000])
    text = bytes(a.train_stream.to(torch.uint8).numpy()).decode("ascii")
    sentences = text.split("\n")[:-1]
    assert all(s[0].isupper() and s.endswith(".") for s in sentences)
    # 40 words, each followed by at most `branching` (3) words (the 35 joins of the
    # 36 training documents may add one each)
    words = text.replace(".\n", " ").lower().split()
    after: dict[str, set[str]] = {}
    for w, nxt in itertools.pairwise(words):
        after.setdefault(w, set()).add(nxt)
    assert len(after) <= 40
    assert sum(len(v) for v in after.values()) <= 40 * 3 + 35
    assert a.test_documents == tuple(f"doc{i}" for i in (9, 19, 29, 39))
    assert is_text(a) and is_sequence_dataset("synthetic-text")
    assert not is_sequence_dataset("fashion-mnist")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context": 0}, "context must be a positive integer"),
        ({"context": 2.5}, "context must be a positive integer"),
        ({"documents": 5}, "documents must be an integer >= 10"),
        ({"vocabulary": 3, "branching": 4}, r"branching \(4\) must be at most vocabulary"),
        ({"context": 10**6}, "the training split has .* fewer than one window"),
    ],
)
def test_synthetic_text_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, DatasetError), match=message):
        load_dataset("synthetic-text", **kwargs)


def test_pickle_carries_the_streams_not_the_windows() -> None:
    data = load_dataset("synthetic-text", context=64)
    blob = pickle.dumps(data)
    window_bytes = data.x_train.numel() * 8
    assert len(blob) < window_bytes / 10  # the windows overlap 64-fold
    again = pickle.loads(blob)
    assert isinstance(again, TextDataset)
    for key in ("x_train", "y_train", "x_test", "y_test", "train_stream"):
        assert torch.equal(getattr(again, key), getattr(data, key)), key
    assert again.unigram_bits == data.unigram_bits
    assert again.x_train.stride() == (1, 1)  # views of the stream again


def test_to_and_first_test_keep_a_text_dataset() -> None:
    data = load_dataset("synthetic-text", context=8)
    moved = data.to("cpu")
    assert isinstance(moved, TextDataset) and moved.x_train.stride() == (1, 1)
    assert torch.equal(moved.x_train[100], data.x_train[100])
    first = data.first_test(5)
    assert isinstance(first, TextDataset) and first.x_test.shape == (5, 8)
    assert torch.equal(first.x_test, data.x_test[:5]) and first.context == 8
    assert data.first_test(None) is data


def test_make_text_dataset_splits_by_the_given_marks() -> None:
    docs = [("a", b"one two three\n"), ("b", b"four five\n"), ("c", b"six seven eight\n")]
    data = make_text_dataset("t", docs, [False, True, False], 4, "here")
    assert data.train_documents == ("a", "c") and data.test_documents == ("b",)
    assert bytes(data.test_stream.numpy().astype(np.uint8)) == b"four five\n"
    with pytest.raises(DatasetError, match="the test split has 10 bytes, fewer than one window"):
        make_text_dataset("t", docs, [False, True, False], 10, "here")
