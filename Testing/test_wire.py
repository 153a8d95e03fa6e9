"""ProbSAMLib.app.wire: the message format of the Slicer worker and the server (a JSON header plus raw numpy
buffers, never pickle). Round trips of every allowed dtype and of nested values; every malformed message a
pipe or a socket could deliver is a one-line WireError, and nothing in one is ever executed."""

import json
import math
import os
import pickle
import struct

import numpy as np
import pytest

from ProbSAMLib.app import wire
from ProbSAMLib.app.wire import WireError, decode, encode


def header_of(message: dict, arrays: bytes = b"") -> bytes:
    """A message with a hand-written header (what a buggy or hostile peer could send)."""
    text = json.dumps(message).encode("utf-8")
    return wire.MAGIC + struct.pack("<I", len(text)) + text + arrays


@pytest.mark.parametrize("dtype", wire.DTYPES)
def test_every_allowed_dtype_round_trips_exactly(dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((3, 4, 5)) * 100).astype(np.dtype(dtype))
    for data in (encode({"a": array}), bytearray(encode({"a": array}))):
        back = decode(data)["a"]
        assert back.dtype == array.dtype and back.shape == array.shape and back.flags.writeable
        np.testing.assert_array_equal(back, array)


def test_nested_values_bool_masks_nan_and_empty_arrays_round_trip():
    masks = np.zeros((2, 3, 4, 4), bool)
    masks[1, 2, 1:3, 1:3] = True
    message = {"type": "result", "id": 7, "masks": masks, "lo": (4, 4, 0), "share": float("nan"),
               "inf": float("-inf"), "none": None, "flag": True, "text": "Sample 01 \u00e9",
               "nested": {"agreement": {"any": masks[0, 0], "all": masks[1, 0]}, "list": [1, [2.5, np.float32(3)]]},
               "empty": np.zeros((0, 3), np.float32), "scalar": np.array(1.5), "big": 2 ** 62,
               "reversed": np.arange(6, dtype=np.int16)[::-1], "big_endian": np.arange(3, dtype=">f4")}
    back = decode(encode(message))
    assert back["masks"].dtype == bool and np.array_equal(back["masks"], masks)
    assert back["lo"] == [4, 4, 0]  # tuples arrive as lists
    assert math.isnan(back["share"]) and back["inf"] == float("-inf")
    assert back["none"] is None and back["flag"] is True and back["text"] == "Sample 01 \u00e9"
    assert np.array_equal(back["nested"]["agreement"]["all"], masks[1, 0])
    assert back["nested"]["list"] == [1, [2.5, 3.0]] and back["big"] == 2 ** 62
    assert back["empty"].shape == (0, 3) and back["scalar"].shape == () and float(back["scalar"]) == 1.5
    assert back["reversed"].tolist() == [5, 4, 3, 2, 1, 0]
    assert back["big_endian"].dtype == np.float32 and back["big_endian"].tolist() == [0.0, 1.0, 2.0]


def test_arrays_decoded_from_a_bytearray_are_views_not_copies():
    """A frame read into a bytearray is not held twice: aligned arrays are views of it."""
    data = bytearray(encode({"masks": np.ones((4, 64, 64), bool), "map": np.ones((64, 64), np.float32)}))
    back = decode(data)
    assert np.shares_memory(back["masks"], np.frombuffer(data, np.uint8))
    back["masks"][0, 0, 0] = False  # writable
    assert not back["masks"][0, 0, 0]


def test_values_that_cannot_be_sent_are_refused_when_encoding():
    for bad in ({"a": np.array([object()])}, {"a": np.zeros(2, np.complex64)}, {1: "int key"}, {"a": {1, 2}}):
        with pytest.raises(TypeError):
            encode(bad)


class Evil:
    """Unpickling this creates a folder: a stand-in for any code a crafted pickle could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def malformed(tmp_path) -> dict:
    good = encode({"a": np.arange(4, dtype=np.float32)})
    return {
        "empty": (b"", "wrong magic"),
        "a pickle (never unpickled)": (pickle.dumps({"type": "sample", "x": Evil(tmp_path / "pwned")}), "wrong magic"),
        "bad magic": (b"PSW9" + good[4:], "wrong magic"),
        "cut short in the header": (good[:10], "cut short"),
        "cut short in the arrays": (good[:-3], "cut short"),
        "trailing bytes": (good + b"\0", "bytes after the last array"),
        "header not JSON": (wire.MAGIC + struct.pack("<I", 3) + b"{x]", "not valid JSON"),
        "header not UTF-8": (wire.MAGIC + struct.pack("<I", 2) + b"\xff\xfe", "not valid JSON"),
        "header a list": (header_of([1, 2]), "not a JSON object"),
        "header nested 100000 deep": (wire.MAGIC + struct.pack("<I", 100000) + b"[" * 100000, "JSON"),
        "a 5000-digit number": (wire.MAGIC + struct.pack("<I", 5008) + b'{"n":' + b"1" * 5000 + b"}" + b"   ",
                                "not valid JSON"),
        "header longer than the limit": (wire.MAGIC + struct.pack("<I", wire.MAX_HEADER_BYTES + 1), "limit"),
        "forged huge shape": (header_of({"a": {"__ndarray__": 0, "dtype": "<f4", "shape": [2 ** 40, 2 ** 40]}},
                                        b"\0" * 16), "cut short"),
        "negative size": (header_of({"a": {"__ndarray__": 0, "dtype": "<f4", "shape": [-1]}}), "shape"),
        "shape not a list": (header_of({"a": {"__ndarray__": 0, "dtype": "<f4", "shape": "4"}}), "shape"),
        "disallowed dtype (object)": (header_of({"a": {"__ndarray__": 0, "dtype": "|O", "shape": [1]}}, b"\0" * 8),
                                      "not allowed"),
        "disallowed dtype (big-endian)": (header_of({"a": {"__ndarray__": 0, "dtype": ">f4", "shape": [1]}},
                                                    b"\0" * 4), "not allowed"),
        "arrays out of order": (header_of({"a": {"__ndarray__": 1, "dtype": "<f4", "shape": [1]}}, b"\0" * 4),
                                "out of order"),
    }


def test_every_malformed_message_is_a_one_line_wire_error(tmp_path):
    for name, (data, fragment) in malformed(tmp_path).items():
        with pytest.raises(WireError) as caught:
            decode(data)
        text = str(caught.value)
        assert fragment in text and "\n" not in text and len(text) < 300, (name, text)
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran


def test_a_message_over_the_limit_is_refused_before_it_is_read():
    data = encode({"a": np.zeros(100, np.float32)})
    with pytest.raises(WireError, match="larger than the limit of 100 bytes"):
        decode(data, max_bytes=100)
    assert decode(data, max_bytes=len(data))["a"].shape == (100,)
