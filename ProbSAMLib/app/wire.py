"""How messages cross a process or network boundary: a JSON header plus raw numpy buffers, never pickle.

The Slicer worker (stdin/stdout frames, ProbSAMLib.app.worker) and the HTTP server (request and response
bodies, ProbSAMLib.app.server) speak the same messages: dicts of plain values (str, int, float, bool, None,
lists, dicts with str keys) and numpy arrays. Unpickling bytes from a pipe or a socket can run any code;
this format can only ever yield such values.

Layout of one encoded message::

    b"PSW1" | uint32 LE header length | header (UTF-8 JSON) | array 0 bytes | array 1 bytes | ...

In the header every array is replaced by ``{"__ndarray__": index, "dtype": "<f4", "shape": [..]}``; its
bytes follow in index order, C-contiguous, little-endian. Tuples arrive as lists. ``decode`` checks every
length, dtype and shape against the bytes it got and raises WireError, one line, on anything else.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Optional

import numpy as np

from ProbSAMLib.errors import InputError

MAGIC = b"PSW1"
_LENGTH = struct.Struct("<I")
# Arrays that can cross: masks (bool), maps and CT values (float32), geometry (float64), labels (ints).
DTYPES = ("|b1", "|u1", "|i1", "<i2", "<u2", "<i4", "<u4", "<i8", "<f4", "<f8")
MAX_HEADER_BYTES = 16 * 2 ** 20


class WireError(InputError):
    """Bytes that are not a well-formed message (cut short, oversized, or not this format)."""


def encode(message: dict) -> bytes:
    """One message (a dict of plain values and numpy arrays) as bytes."""
    return b"".join(encode_parts(message))


def encode_parts(message: dict) -> list:
    """``encode(message)`` as a list of buffers, the arrays' own memory uncopied: a writer that sends them in
    turn never holds a second copy of a (gigabyte) result."""
    arrays: list = []
    header = json.dumps(_to_plain(message, arrays), allow_nan=True, separators=(",", ":")).encode("utf-8")
    parts = [MAGIC, _LENGTH.pack(len(header)), header]
    parts.extend(np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays)
    return parts


def decode(data: bytes, max_bytes: Optional[int] = None) -> dict:
    """The message ``encode`` made; WireError for anything else (nothing is executed or allocated past
    ``max_bytes``). From a writable buffer (a bytearray) the arrays are views of it where they are aligned,
    not copies."""
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes is larger than the limit of {max_bytes} bytes")
    view = memoryview(data)
    if len(view) < len(MAGIC) + _LENGTH.size or bytes(view[:4]) != MAGIC:
        raise WireError("not a ProbSAM message (wrong magic bytes; a client or server of another version?)")
    (length,) = _LENGTH.unpack(view[4:8])
    if length > MAX_HEADER_BYTES:
        raise WireError(f"message header of {length} bytes is larger than the limit of {MAX_HEADER_BYTES} bytes")
    if length > len(view) - 8:
        raise WireError(f"message header of {length} bytes does not fit the {len(view) - 8} bytes received "
                        f"(cut short?)")
    try:
        header = json.loads(bytes(view[8:8 + length]).decode("utf-8"))
    # ValueError: a number of more than 4300 digits; RecursionError: lists nested thousands deep
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise WireError(f"message header is not valid JSON: {str(error).splitlines()[0][:200]}") from None
    if not isinstance(header, dict):
        raise WireError("message header is not a JSON object")
    reader = _ArrayReader(view, 8 + length)
    try:
        message = _from_plain(header, reader)
    except RecursionError:
        raise WireError("message header is nested too deeply") from None
    reader.finish()
    return message


# --- encoding -------------------------------------------------------------------------------------------
def _to_plain(value: Any, arrays: list) -> Any:
    if isinstance(value, np.ndarray):
        array = value.astype(value.dtype.newbyteorder("<"), copy=False)
        if array.dtype.str not in DTYPES:
            raise TypeError(f"arrays of dtype {value.dtype} cannot be sent; use one of {', '.join(DTYPES)}")
        arrays.append(array)
        return {"__ndarray__": len(arrays) - 1, "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"message keys must be strings, got {sorted(map(repr, value))[:3]}")
        return {key: _to_plain(item, arrays) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item, arrays) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"a value of type {type(value).__name__} cannot be sent in a message")


# --- decoding -------------------------------------------------------------------------------------------
class _ArrayReader:
    """Hands out the buffers after the header, in order, checking each against the bytes left."""

    def __init__(self, view: memoryview, offset: int):
        self.view, self.offset, self.next_index = view, offset, 0

    def take(self, spec: dict) -> np.ndarray:
        index, dtype, shape = spec.get("__ndarray__"), spec.get("dtype"), spec.get("shape")
        if index != self.next_index:
            raise WireError(f"array {index} out of order (expected {self.next_index})")
        if dtype not in DTYPES:
            raise WireError(f"array {index}: dtype {dtype!r} is not allowed")
        if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                 for n in shape) and len(shape) <= 8):
            raise WireError(f"array {index}: shape {shape!r} is not a list of at most 8 sizes >= 0")
        count = int(np.prod(shape, dtype=object))  # Python ints: a forged shape cannot overflow
        size = count * np.dtype(dtype).itemsize
        if size > len(self.view) - self.offset:
            raise WireError(f"array {index} of shape {tuple(shape)} needs {size} bytes, only "
                            f"{len(self.view) - self.offset} left (message cut short?)")
        array = np.frombuffer(self.view, dtype=dtype, count=count, offset=self.offset).reshape(shape)
        self.offset += size
        self.next_index += 1
        if array.flags.writeable and array.flags.aligned and array.dtype.isnative:
            return array  # a view of the caller's bytearray: a large result is not held twice
        return array.astype(array.dtype.newbyteorder("="), copy=True)  # writable, aligned, native order

    def finish(self) -> None:
        if self.offset != len(self.view):
            raise WireError(f"{len(self.view) - self.offset} bytes after the last array (not this format)")


def _from_plain(value: Any, reader: _ArrayReader) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return reader.take(value)
        return {key: _from_plain(item, reader) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_plain(item, reader) for item in value]
    return value
