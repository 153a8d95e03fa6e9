"""A minimal NRRD writer (attached header + raw or gzip data) and a header reader.

Written by hand rather than through SimpleITK because Slicer's segmentation files need header fields
that SimpleITK does not let us choose: a ``list`` kind for the segment axis and ``none`` for its space
direction (SimpleITK writes ``vector``), and streaming the data slab by slab keeps memory flat for many
samples. Format reference: http://teem.sourceforge.net/nrrd/format.html (NRRD0004).

Axis order follows NRRD: the first axis in ``sizes`` varies fastest, i.e. it is numpy's LAST axis.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

_NRRD_TYPES = {
    np.dtype(np.int8): "signed char", np.dtype(np.uint8): "unsigned char",
    np.dtype(np.int16): "short", np.dtype(np.uint16): "unsigned short",
    np.dtype(np.int32): "int", np.dtype(np.uint32): "unsigned int",
    np.dtype(np.int64): "long long", np.dtype(np.uint64): "unsigned long long",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
}


def _number(value: float) -> str:
    # repr gives the shortest string that reads back to the same double: geometry survives exactly.
    value = float(value)
    return repr(0.0 if value == 0 else value)


def _vector(values: Sequence[float]) -> str:
    return "(" + ",".join(_number(v) for v in values) + ")"


def _clean_value(text: str) -> str:
    # A key/value line ends at the newline; NRRD has no escaping we can rely on across readers.
    return str(text).replace("\r", " ").replace("\n", " ")


def format_header(dtype, sizes: Sequence[int], space_directions: Sequence[Optional[Sequence[float]]],
                  kinds: Sequence[str], space_origin: Sequence[float], keyvalues: dict,
                  encoding: str = "gzip", space: str = "left-posterior-superior") -> str:
    """The NRRD header text, ending with the blank line that separates it from the data.

    sizes, space_directions and kinds are per NRRD axis (fastest first); a direction of None writes
    ``none`` (a non-spatial axis such as the list of segments).
    """
    dtype = np.dtype(dtype)
    if dtype not in _NRRD_TYPES:
        raise ValueError(f"NRRD writer: unsupported dtype {dtype}")
    if not len(sizes) == len(space_directions) == len(kinds):
        raise ValueError("sizes, space_directions and kinds must have one entry per axis")
    directions = " ".join("none" if d is None else _vector(d) for d in space_directions)
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {_NRRD_TYPES[dtype]}",
        f"dimension: {len(sizes)}",
        f"space: {space}",
        "sizes: " + " ".join(str(int(s)) for s in sizes),
        f"space directions: {directions}",
        "kinds: " + " ".join(kinds),
    ]
    if dtype.itemsize > 1:
        lines.append("endian: little")
    lines += [f"encoding: {encoding}", f"space origin: {_vector(space_origin)}"]
    for key, value in keyvalues.items():
        if ":=" in key or "\n" in key:
            raise ValueError(f"invalid NRRD key {key!r}")
        lines.append(f"{key}:={_clean_value(value)}")
    return "\n".join(lines) + "\n\n"


def write_nrrd(path, chunks: Iterable[np.ndarray], header: str, dtype, compress: bool = True,
               compresslevel: int = 4) -> Path:
    """Write ``header`` (from :func:`format_header`) then the data, given as C-ordered chunks.

    The chunks are consecutive slabs along numpy's first axis (NRRD's slowest), so a large array can be
    streamed without building it whole. The caller's header must say ``encoding: gzip`` iff compress.
    """
    path = Path(path)
    dtype = np.dtype(dtype).newbyteorder("<")
    with open(path, "wb") as raw:
        raw.write(header.encode("latin-1"))
        # mtime=0: identical inputs give byte-identical files (reproducible outputs, easy to compare).
        out = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) if compress else raw
        try:
            for chunk in chunks:
                out.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
        finally:
            if compress:
                out.close()
    return path


def read_header(path) -> tuple:
    """Parse the header of an attached-header NRRD file: ``(fields, keyvalues)``, both str → str.

    ``fields`` are the standard ``field: value`` lines (lower-case names), ``keyvalues`` the ``key:=value``
    lines (e.g. Slicer's ``Segment0_Name``). Comments are skipped.
    """
    fields, keyvalues = {}, {}
    with open(path, "rb") as f:
        magic = f.readline().decode("latin-1").strip()
        if not magic.startswith("NRRD"):
            raise ValueError(f"{path} is not a NRRD file (starts with {magic[:20]!r})")
        for raw in f:
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break
            if line.startswith("#"):
                continue
            if ":=" in line:
                key, value = line.split(":=", 1)
                keyvalues[key] = value
            elif ": " in line:
                key, value = line.split(": ", 1)
                fields[key.strip().lower()] = value.strip()
    return fields, keyvalues
