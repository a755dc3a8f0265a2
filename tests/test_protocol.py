"""policies.protocol: msgpack + numpy round trips, refused dtypes, no pickle."""

import pathlib
import pickle

import msgpack
import numpy as np
import pytest

from policies.protocol import ProtocolError, packb, unpackb

DTYPES = ["uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64", "float16", "float32", "float64",
          "bool", ">f4", ">i8", "<U7", "S5"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (4, 0, 2), (3, 4, 3)])
def test_array_round_trip(dtype, shape):
    rng = np.random.default_rng(0)
    a = np.asarray(rng.random(shape) * 100).astype(dtype)
    b = unpackb(packb(a))
    assert isinstance(b, np.ndarray)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    assert b.flags.writeable
    b[...] = b  # writable for real, not just flagged


def test_non_contiguous_and_views():
    a = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    for v in (a[:, ::2], a.transpose(2, 0, 1), a[..., 1], np.asfortranarray(a)):
        np.testing.assert_array_equal(unpackb(packb(v)), v)


def test_nested_message():
    img = np.random.default_rng(1).integers(0, 256, (256, 320, 3), dtype=np.uint8)
    msg = {"type": "infer", "observation": {"image": img, "instruction": "pick coke can", "seed": 3},
           "list": [1, 2.5, None, True, "x", b"raw", [np.zeros(2, np.int16), {"deep": np.ones((1, 1), bool)}]],
           "tuple": (1, 2), "scalars": [np.int64(-7), np.float32(1.5), np.bool_(True), np.uint8(200)]}
    out = unpackb(packb(msg))
    assert out["type"] == "infer" and out["observation"]["instruction"] == "pick coke can"
    assert out["observation"]["seed"] == 3
    np.testing.assert_array_equal(out["observation"]["image"], img)
    assert out["list"][:6] == [1, 2.5, None, True, "x", b"raw"]
    assert out["list"][6][0].dtype == np.int16 and out["list"][6][1]["deep"].dtype == bool
    assert out["tuple"] == [1, 2]  # tuples come back as lists
    s = out["scalars"]
    assert [type(x) for x in s] == [np.int64, np.float32, np.bool_, np.uint8]
    assert s[0] == -7 and s[1] == 1.5 and s[2] and s[3] == 200


@pytest.mark.parametrize("bad", [np.array([1, "a"], dtype=object), np.zeros(3, dtype=[("a", "f4"), ("b", "i4")]),
                                 np.zeros(2, np.complex64), np.complex128(1j), np.void(b"abc")])
def test_refused_dtypes_on_encode(bad):
    with pytest.raises(ValueError, match="cannot"):
        packb({"x": [bad]})


def test_refused_dtypes_on_decode():
    for dt in ("|O", "<c8", "|V8"):
        forged = msgpack.packb({"__ndarray__": True, "data": b"\0" * 8, "dtype": dt, "shape": [1]}, use_bin_type=True)
        with pytest.raises(ValueError, match="cannot travel"):
            unpackb(forged)


def test_unknown_python_objects_refused():
    with pytest.raises(ValueError, match="cannot encode"):
        packb({"x": {1, 2}})
    with pytest.raises(ValueError, match="cannot encode"):
        packb(object())


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\x01", b"garbage that is not msgpack\xff\xff", b"\x81\xa1a\x01extra"])
def test_malformed_bytes(data):
    with pytest.raises(ProtocolError):
        unpackb(data)


def test_corrupt_array_payloads():
    def forged(**kw):
        d = {"__ndarray__": True, "data": b"\0" * 8, "dtype": "<f4", "shape": [2]}
        d.update(kw)
        return msgpack.packb(d, use_bin_type=True)

    assert unpackb(forged()).shape == (2,)
    for kw in ({"shape": [3]}, {"shape": [-2]}, {"shape": "2"}, {"dtype": "not-a-dtype"}, {"data": "text"}):
        with pytest.raises(ValueError):
            unpackb(forged(**kw))
    with pytest.raises(ValueError, match="binary"):
        unpackb("a text frame")


def test_no_pickle_anywhere(monkeypatch):
    src = pathlib.Path(__file__).parents[1] / "policies"
    for name in ("protocol.py", "serve.py", "client.py", "chunking.py", "__init__.py"):
        text = src.joinpath(name).read_text()
        assert "import pickle" not in text and "allow_pickle" not in text and "pickle.load" not in text, name

    def refuse(*a, **k):
        raise AssertionError("pickle must never run on the wire path")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "dumps", refuse)
    msg = {"a": np.arange(3), "b": np.float32(2.0), "c": [np.zeros((2, 2), np.uint8)]}
    out = unpackb(packb(msg))
    np.testing.assert_array_equal(out["a"], msg["a"])
