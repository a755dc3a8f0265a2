"""Wire format of the policy server: msgpack with numpy arrays, never pickle.

A message is any nest of dicts (str keys), lists/tuples, str, bytes, int, float, bool, None, numpy
arrays and numpy scalars. Arrays travel as

    {"__ndarray__": True, "data": <raw bytes, C order>, "dtype": "<f4", "shape": [H, W, C]}

and numpy scalars as {"__npgeneric__": True, "data": <bytes>, "dtype": "<i8"}. The dtype string
carries the byte order, so both ends may differ in endianness. Object, void (structured) and
complex dtypes are refused with ValueError on both ends: nothing on the wire can make the reader
run code. Decoded arrays are fresh, writable copies. Tuples come back as lists.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 2**20  # 64 MiB: a 512x640x3 uint8 frame is ~1 MiB, a (50, 7) float32 chunk 1.4 KiB
_REFUSED_KINDS = {"O": "object", "V": "void/structured", "c": "complex"}


class ProtocolError(ValueError):
    """A message that cannot be encoded or decoded (refused dtype, corrupt or non-msgpack bytes)."""


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind in _REFUSED_KINDS:
        raise ProtocolError(f"dtype {dtype} ({_REFUSED_KINDS[dtype.kind]}) cannot travel over the policy protocol; "
                         "convert it to a numeric, bool or string array first (e.g. .astype(np.float32))")


def _encode_hook(obj: Any) -> Any:
    """msgpack `default`: numpy arrays and scalars -> marked dicts; anything else unknown is refused."""
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {"__ndarray__": True, "data": obj.tobytes(order="C"), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return {"__npgeneric__": True, "data": obj.tobytes(), "dtype": obj.dtype.str}
    raise ProtocolError(f"cannot encode {type(obj).__name__} for the policy protocol; send dicts, lists, str, bytes, "
                     "numbers, bool, None or numpy arrays")


def _decode_hook(obj: dict) -> Any:
    """msgpack `object_hook`: marked dicts -> writable numpy arrays / scalars."""
    if obj.get("__ndarray__") is True:
        dtype = _wire_dtype(obj)
        shape = obj.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ProtocolError(f"bad ndarray shape {shape!r} in message: expected a list of non-negative ints")
        data = obj["data"]
        n = int(np.prod(shape, dtype=np.int64))
        if len(data) != n * dtype.itemsize:
            raise ProtocolError(f"ndarray payload holds {len(data)} bytes but shape {shape} of {dtype} needs "
                             f"{n * dtype.itemsize}: the message is truncated or corrupt")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # copy: frombuffer views are read-only
    if obj.get("__npgeneric__") is True:
        dtype = _wire_dtype(obj)
        if len(obj["data"]) != dtype.itemsize:
            raise ProtocolError(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes, got {len(obj['data'])}")
        return np.frombuffer(obj["data"], dtype=dtype)[0]
    return obj


def _wire_dtype(obj: dict) -> np.dtype:
    if not isinstance(obj.get("dtype"), str) or not isinstance(obj.get("data"), bytes):
        raise ProtocolError("array marker needs a 'dtype' string and 'data' bytes: the message is corrupt")
    try:
        dtype = np.dtype(obj["dtype"])
    except TypeError as e:
        raise ProtocolError(f"unknown dtype {obj['dtype']!r} in message") from e
    _check_dtype(dtype)
    return dtype


def packb(obj: Any) -> bytes:
    """Encode a nested message (see module docstring) to msgpack bytes."""
    return msgpack.packb(obj, default=_encode_hook, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Decode msgpack bytes produced by `packb`; raises ValueError on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary msgpack frame, got {type(data).__name__}; send bytes from packb()")
    try:
        return msgpack.unpackb(data, object_hook=_decode_hook, raw=False, max_bin_len=MAX_MESSAGE_BYTES,
                               max_str_len=MAX_MESSAGE_BYTES)
    except ProtocolError:
        raise
    except Exception as e:  # ExtraData, FormatError, StackError, UnicodeDecodeError, TypeError, ...
        raise ProtocolError(f"malformed msgpack message ({type(e).__name__}: {e}); "
                            "encode with policies.protocol.packb") from e
