"""``synthetic-text``: a seeded English-like byte stream with structure a small
language model learns in a few hundred steps (for tests and quick tries).

The source is a first-order Markov chain over a made-up vocabulary:

- ``vocabulary`` distinct lowercase words of 2 to 8 letters, drawn at random;
- each word has ``branching`` possible successors (distinct words, drawn at random)
  with probabilities drawn from a flat Dirichlet: given the word, the next word has
  at most ``log2(branching)`` bits of entropy, and its spelling, once its first
  letters are seen, none;
- a sentence is 4 to 12 words, its first word capitalized, the words separated by a
  space and the sentence ended by ``".\\n"``; a document is ``sentences`` sentences.

So a model that has learnt the spellings and the successors predicts most bytes
almost surely, far below the byte-frequency (unigram) entropy; a model that has not
sits at it. Every tenth document (the 10th, 20th, ...) is the test split.
"""

from __future__ import annotations

import os

import numpy as np

from covshift.data.registry import _register
from covshift.data.text import TextDataset, make_text_dataset

__all__ = ["synthetic_text"]

_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
_TEST_EVERY = 10


def _words(rng: np.random.Generator, count: int) -> list[bytes]:
    words: list[bytes] = []
    seen: set[bytes] = set()
    while len(words) < count:
        word = _LETTERS[rng.integers(0, 26, int(rng.integers(2, 9)))].tobytes()
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


@_register("synthetic-text", sequence=True)
def synthetic_text(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    context: int = 64,
    documents: int = 40,
    sentences: int = 40,
    vocabulary: int = 40,
    branching: int = 3,
    seed: int = 0,
) -> TextDataset:
    """Seeded Markov-chain text (see the module docstring); ``data_dir`` is ignored.

    Args:
        context: bytes per window.
        documents: number of documents (every tenth is a test document).
        sentences: sentences per document.
        vocabulary: number of distinct words.
        branching: possible successors of each word.
        seed: the seed of everything drawn.
    """
    for arg, value, low in (
        ("documents", documents, _TEST_EVERY),
        ("sentences", sentences, 1),
        ("vocabulary", vocabulary, 2),
        ("branching", branching, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"synthetic-text: {arg} must be an integer >= {low}, got {value!r}")
    if branching > vocabulary:
        raise ValueError(
            f"synthetic-text: branching ({branching}) must be at most vocabulary ({vocabulary})"
        )
    rng = np.random.default_rng(seed)
    words = _words(rng, vocabulary)
    successors = np.stack([rng.choice(vocabulary, branching, replace=False) for _ in words])
    weights = rng.dirichlet(np.ones(branching), size=vocabulary)  # (V, branching)

    def document() -> bytes:
        out: list[bytes] = []
        word = int(rng.integers(vocabulary))
        for _ in range(sentences):
            length = int(rng.integers(4, 13))
            sentence = []
            for _ in range(length):
                sentence.append(words[word])
                word = int(successors[word, rng.choice(branching, p=weights[word])])
            sentence[0] = sentence[0].capitalize()
            out.append(b" ".join(sentence) + b".\n")
        return b"".join(out)

    docs = [(f"doc{i}", document()) for i in range(documents)]
    is_test = [(i + 1) % _TEST_EVERY == 0 for i in range(documents)]
    settings = (
        f"seed={seed}, documents={documents}, sentences={sentences}, "
        f"vocabulary={vocabulary}, branching={branching}, context={context}"
    )
    return make_text_dataset(
        "synthetic-text", docs, is_test, context, f"synthetic-text({settings})"
    )
