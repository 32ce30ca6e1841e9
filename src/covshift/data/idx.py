"""The IDX file format (LeCun et al., used by MNIST and Fashion-MNIST): :func:`read_idx`.

An IDX file is a big-endian header ``0x00 0x00 <type code> <ndim>`` followed by
``ndim`` 32-bit sizes and the raw values. Files may be gzipped. The reader checks
everything it is told against what the file holds, since a foreign or truncated
file must be an error naming it, never a silently wrong array.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from covshift.data.dataset import DatasetError

__all__ = ["IdxFormatError", "read_idx"]

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxFormatError(DatasetError, ValueError):
    """A file is not a valid IDX file (foreign, truncated, or with trailing bytes)."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a native-endian numpy array.

    Checks the magic number (two zero bytes, a known type code, ndim >= 1), that the
    dimensions are positive, and that the payload has exactly ``prod(dims)`` values.

    Raises:
        IdxFormatError: naming the file and what is wrong with it.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":
            try:
                raw = gzip.decompress(f.read())
            except (OSError, EOFError, zlib.error) as e:
                raise IdxFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from None
        else:
            raw = f.read()
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header (4 bytes)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise IdxFormatError(
            f"{path}: bad magic number 0x{raw[:4].hex()}; an IDX file starts with 0x0000 then a "
            f"type code ({', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}) and ndim >= 1"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IdxFormatError(f"{path}: truncated header: needs {ndim} dimension sizes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if any(d == 0 for d in dims):
        raise IdxFormatError(f"{path}: dimension sizes {dims} contain a zero")
    dtype = _IDX_DTYPES[type_code]
    # Python integers: a product of header sizes cannot overflow (np.prod of uint32
    # wraps around and could match a short payload).
    expected = math.prod(dims) * dtype.itemsize
    payload = len(raw) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{path}: {what}: header says {dims} x {dtype.itemsize} bytes = {expected} bytes of "
            f"data, file has {payload}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)
