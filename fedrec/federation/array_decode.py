"""A faster `flwr.app.Array.numpy()` for the processes that decode every reply.

Flower 1.42 decodes an Array with `np.load(BytesIO(data))`, which parses the .npy header,
a Python dict literal, with `ast.literal_eval` each time. The ServerApp decodes each of a
round's replies three times (the reply checks in fedrec/federation/replies.py, the update
norm, Flower's weighted mean), and in a 943-client round py-spy found 51% of the
simulation process's samples in `Array.numpy`, 20% in the header parser alone.

`decode` reads the same bytes to the same array (a writable copy, as np.load returns),
parsing each distinct header once (a round's replies share a dozen headers). Anything but
a plain version 1-3 .npy of a dtype without Python objects goes to np.load, so what
np.load refuses is still refused. tests/test_array_decode.py checks agreement.
"""

import ast
from functools import lru_cache
from io import BytesIO

import numpy as np
from flwr.app import Array

MAGIC = b"\x93NUMPY"
MAX_HEADER = 10_000  # np.load's default max_header_size: a longer header goes to np.load
ORIGINAL = Array.numpy


@lru_cache(maxsize=256)
def _header(raw: bytes, encoding: str) -> tuple[np.dtype, bool, tuple[int, ...]] | None:
    try:
        h = ast.literal_eval(raw.decode(encoding))
    except (ValueError, SyntaxError, UnicodeDecodeError):
        return None
    if not isinstance(h, dict) or set(h) != {"descr", "fortran_order", "shape"}:
        return None
    shape = h["shape"]
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(h["fortran_order"], bool)):
        return None
    try:
        dtype = np.lib.format.descr_to_dtype(h["descr"])
    except (TypeError, ValueError):
        return None
    if dtype.hasobject:
        return None
    return dtype, h["fortran_order"], shape


def decode(data: bytes) -> np.ndarray:
    """The array np.load(BytesIO(data), allow_pickle=False) returns."""
    view = memoryview(data)
    parsed = None
    if bytes(view[:6]) == MAGIC and view[6] in (1, 2, 3) and len(view) >= 10:
        width = 2 if view[6] == 1 else 4
        start = 8 + width
        size = int.from_bytes(view[8:start], "little")
        if size <= MAX_HEADER:
            parsed = _header(bytes(view[start:start + size]), "utf8" if view[6] == 3 else "latin1")
        offset = start + size
    if parsed is None:
        return np.load(BytesIO(data), allow_pickle=False)
    dtype, fortran, shape = parsed
    count = int(np.prod(shape, dtype=np.int64))
    if len(view) - offset < count * dtype.itemsize:
        return np.load(BytesIO(data), allow_pickle=False)  # truncated: np.load's error
    flat = np.frombuffer(view, dtype, count=count, offset=offset)
    if fortran:
        return flat.reshape(shape[::-1]).transpose().copy(order="F")
    return flat.reshape(shape).copy()


def _numpy(self: Array) -> np.ndarray:
    if self.stype != "numpy.ndarray":
        return ORIGINAL(self)  # its error for other serialization types
    return decode(self.data)


def install() -> None:
    """Decode Arrays with `decode` in this process (idempotent)."""
    Array.numpy = _numpy
