"""Wire format of the policy server: msgpack with numpy arrays, never pickle.

A message is any nest of dicts (str keys), lists/tuples, str, bytes, int, float, bool, None, numpy
arrays and numpy scalars. Arrays travel as

    {"__ndarray__": True, "data": <raw bytes, C order>, "dtype": "<f4", "shape": [H, W, C]}

and numpy scalars as {"__npgeneric__": True, "data": <bytes>, "dtype": "<i8"}. The dtype string
carries the byte order, so both ends may differ in endianness. Object, void (structured) and
complex dtypes are refused with ValueError on both ends: nothing on the wire can make the reader
run code. Decoded arrays are fresh, writable copies. Tuples come back as lists.

openpi's dialect (``openpi_client.msgpack_numpy``) marks arrays with bytes keys instead,
``{b"__ndarray__": True, b"data": <bytes>, b"dtype": "<f4", b"shape": [..]}``, and numpy scalars as
``{b"__npgeneric__": True, b"data": <python scalar>, b"dtype": "<i8"}``. `unpackb` reads both (with the
same checks); `unpackb_dialect` also says which one a message used, and ``packb(obj, dialect="openpi")``
writes openpi's, so the server answers an openpi client in the form its `unpackb` understands.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
DIALECTS = ("toolkit", "openpi")
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
    return _encode(obj, openpi=False)


def _encode_openpi(obj: Any) -> Any:
    """msgpack `default` in openpi's dialect (bytes marker keys, scalars as python values)."""
    return _encode(obj, openpi=True)


def _encode(obj: Any, openpi: bool) -> Any:
    if openpi and isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {b"__ndarray__": True, b"data": obj.tobytes(order="C"), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if openpi and isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {"__ndarray__": True, "data": obj.tobytes(order="C"), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return {"__npgeneric__": True, "data": obj.tobytes(), "dtype": obj.dtype.str}
    raise ProtocolError(f"cannot encode {type(obj).__name__} for the policy protocol; send dicts, lists, str, bytes, "
                     "numbers, bool, None or numpy arrays")


def _decode_hook(obj: dict, seen: set | None = None) -> Any:
    """msgpack `object_hook`: marked dicts (either dialect) -> writable numpy arrays / scalars."""
    if b"__ndarray__" in obj or b"__npgeneric__" in obj:  # openpi's dialect: the same checks, str keys
        if seen is not None:
            seen.add("openpi")
        marked = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
        if marked.get("__npgeneric__") is True:
            return _openpi_scalar(marked)
        return _decode_hook(marked)
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


def _openpi_scalar(obj: dict) -> np.generic:
    """openpi's numpy scalar marker: {"dtype": str, "data": a python bool / int / float / str / bytes}."""
    value = obj.get("data")
    if not isinstance(value, (bool, int, float, str, bytes)):
        raise ProtocolError(f"numpy scalar marker holds a {type(value).__name__}, not a number: the message is corrupt")
    dtype = _wire_dtype({"dtype": obj.get("dtype"), "data": b""})
    try:
        return dtype.type(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"numpy scalar of {dtype} cannot hold the value sent ({type(e).__name__})") from e


def _wire_dtype(obj: dict) -> np.dtype:
    if not isinstance(obj.get("dtype"), str) or not isinstance(obj.get("data"), bytes):
        raise ProtocolError("array marker needs a 'dtype' string and 'data' bytes: the message is corrupt")
    try:
        dtype = np.dtype(obj["dtype"])
    except TypeError as e:
        raise ProtocolError(f"unknown dtype {obj['dtype']!r} in message") from e
    _check_dtype(dtype)
    return dtype


def packb(obj: Any, dialect: str = "toolkit") -> bytes:
    """Encode a nested message (see module docstring) to msgpack bytes; dialect "openpi" marks arrays as
    openpi_client.msgpack_numpy does."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown wire dialect {dialect!r}; use one of {DIALECTS}")
    return msgpack.packb(obj, default=_encode_openpi if dialect == "openpi" else _encode_hook, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Decode msgpack bytes produced by `packb` (or openpi's packer); raises ValueError on anything malformed."""
    return unpackb_dialect(data)[0]


def unpackb_dialect(data: bytes) -> tuple[Any, str]:
    """Decode like `unpackb` and say which dialect the message's arrays used ("toolkit" when it has none)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary msgpack frame, got {type(data).__name__}; send bytes from packb()")
    seen: set[str] = set()
    try:
        obj = msgpack.unpackb(data, object_hook=lambda o: _decode_hook(o, seen), raw=False,
                              max_bin_len=MAX_MESSAGE_BYTES, max_str_len=MAX_MESSAGE_BYTES)
    except ProtocolError:
        raise
    except Exception as e:  # ExtraData, FormatError, StackError, UnicodeDecodeError, TypeError, ...
        raise ProtocolError(f"malformed msgpack message ({type(e).__name__}: {str(e)[:200]}); "
                            "encode with policies.protocol.packb") from e
    return obj, ("openpi" if seen else "toolkit")
