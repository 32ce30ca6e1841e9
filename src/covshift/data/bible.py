"""``world-english-bible``: real English text for the language model, offline.

The World English Bible (WEB, 2020 stable text, with the deuterocanon: 81 books,
about 5.0 MB of plain text) is in the public domain ("This work is not copyrighted.
It is in the Public Domain", its module's DistributionLicense). Debian ships it as
``sword-text-web``, a module of the SWORD project (no dependencies, 4 MB), in the
``zText`` format: per testament, ``<t>.bzz`` holds zlib-compressed blocks and
``<t>.bzs`` indexes them, 12 bytes a block: offset, compressed size and
uncompressed size, little-endian uint32. The text is OSIS XML.

From it covshift keeps each book's running text (documents = books):

- a book is what lies between its ``<div type="book" sID=...>`` and matching
  ``eID`` milestones (the preface and the glossary are not books, and are dropped);
- footnotes (``<note>...</note>``) are dropped: they are cross-references and
  translators' remarks, not the running text; where one stood between two words a
  space is kept;
- paragraph, poetry-line, line-break and chapter starts, and heading ends, become a
  newline; every other tag is dropped (Strong's numbers among them);
- runs of spaces become one space, blank lines one newline; each book ends with one.

The split is by book: every tenth book in canonical order (the 10th, 20th, ...: 2
Samuel, Esther, Isaiah, Obadiah, 2 Esdras, Romans, 2 Timothy, Jude; about 10% of the
bytes) is the test (validation) split, the other 73 books the training split.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

from covshift.data.dataset import DatasetError
from covshift.data.registry import _register
from covshift.data.text import TextDataset, make_text_dataset

__all__ = ["DEFAULT_WEB_DIR", "read_sword_books"]

DEFAULT_WEB_DIR = Path("/usr/share/sword/modules/texts/ztext/engWEB2015eb")
_TEST_EVERY = 10  # every 10th book (the 10th, 20th, ...) is a test book

_BOOK = re.compile(r'<div\b[^>]*\btype="book"[^>]*/>')
_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_BREAK = re.compile(r'<(?:div|l|lg|chapter)\b[^>]*\bsID="[^"]*"[^>]*/>|<lb\b[^>]*/>|</title>')
_TAG = re.compile(r"<[^>]*>")
# Where a footnote stood: nothing before punctuation or a space, else a space.
_NOTE_MARK = "\x00"
_NOTE_BEFORE_GAP = re.compile("\x00(?=[\\s.,;:!?\u201d\u2019)\\]]|$)")


def _attribute(tag: str, name: str) -> str | None:
    match = re.search(rf'\b{name}="([^"]*)"', tag)
    return None if match is None else match.group(1)


def _read_blocks(folder: Path, testament: str) -> bytes:
    index_path, data_path = folder / f"{testament}.bzs", folder / f"{testament}.bzz"
    for path in (index_path, data_path):
        if not path.is_file():
            raise DatasetError(
                f"world-english-bible: {path} not found; install Debian's sword-text-web "
                f"(apt-get install -y sword-text-web) or point data_dir "
                "at a SWORD zText module folder (ot.bzs, ot.bzz, nt.bzs, nt.bzz)"
            )
    index, data = index_path.read_bytes(), data_path.read_bytes()
    if len(index) % 12:
        raise DatasetError(
            f"{index_path}: {len(index)} bytes, not a whole number of 12-byte entries"
        )
    blocks = []
    for i in range(len(index) // 12):
        offset, size, unpacked = struct.unpack_from("<III", index, 12 * i)
        try:
            block = zlib.decompress(data[offset : offset + size])
        except zlib.error as e:
            raise DatasetError(f"{data_path}: block {i} is corrupt ({e})") from None
        if len(block) != unpacked:
            raise DatasetError(
                f"{data_path}: block {i} unpacks to {len(block)} bytes, its index says {unpacked}"
            )
        blocks.append(block)
    return b"".join(blocks)


def _plain(osis: str) -> str:
    """A book's OSIS markup as plain text (see the module docstring)."""
    text = _NOTE.sub(_NOTE_MARK, osis)
    text = _BREAK.sub("\n", text)
    text = _TAG.sub("", text)
    text = _NOTE_BEFORE_GAP.sub("", text).replace(_NOTE_MARK, " ")
    text = re.sub(r"[ \t\r]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    return re.sub(r"\n+", "\n", text).strip() + "\n"


def read_sword_books(folder: str | os.PathLike[str]) -> list[tuple[str, bytes]]:
    """The books of a SWORD zText module in ``folder``, in canonical order, as
    ``(osisID, UTF-8 plain text)`` (see the module docstring for what is kept).

    Raises:
        DatasetError: a file is missing or corrupt, or the module holds no book.
    """
    folder = Path(folder)
    osis = b"".join(_read_blocks(folder, t) for t in ("ot", "nt")).decode("utf-8")
    opened: dict[str, tuple[str, int]] = {}
    books: list[tuple[str, bytes]] = []
    for match in _BOOK.finditer(osis):
        tag = match.group(0)
        name = _attribute(tag, "osisID") or f"book{len(books)}"
        start, end = _attribute(tag, "sID"), _attribute(tag, "eID")
        if start is not None:
            opened[start] = (name, match.end())
        elif end is not None and end in opened:
            name, begin = opened.pop(end)
            books.append((name, _plain(osis[begin : match.start()]).encode("utf-8")))
    if not books:
        raise DatasetError(f"world-english-bible: {folder} holds no book (no OSIS book divisions)")
    return books


@_register("world-english-bible", sequence=True)
def world_english_bible(
    data_dir: str | os.PathLike[str] | None = None, *, context: int = 128
) -> TextDataset:
    """The World English Bible as bytes, split by book (see the module docstring).

    Args:
        data_dir: the module's folder; defaults to where Debian's ``sword-text-web``
            puts it (``$COVSHIFT_DATA_DIR``, the folder of the IDX datasets, is not
            consulted).
        context: bytes per window.
    """
    folder = DEFAULT_WEB_DIR if data_dir is None else Path(data_dir)
    books = read_sword_books(folder)
    is_test = [(i + 1) % _TEST_EVERY == 0 for i in range(len(books))]
    return make_text_dataset(
        "world-english-bible", books, is_test, context, source=f"{folder} (context {context})"
    )
