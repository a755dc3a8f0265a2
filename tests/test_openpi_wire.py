"""openpi wire compatibility: the published `openpi-client` against our server, our client against an openpi server."""

import asyncio
import threading
import traceback

import numpy as np
import pytest
import torch

from policies.client import PolicyClient, PolicyServerError, RemotePolicy
from policies.protocol import ProtocolError, packb, unpackb, unpackb_dialect
from policies.serve import PolicyServer

openpi_client = pytest.importorskip("openpi_client", reason="pip install openpi-client (the dev extra)")
from openpi_client import msgpack_numpy as openpi_msgpack  # noqa: E402
from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402
from policy_doubles import INSTR, H, _image, _make_policy  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for key in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def policy():
    return _make_policy(sampling_steps=2)


def test_openpi_arrays_decode_and_encode_both_ways():
    obs = {"observation/image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3), "prompt": "go",
           "observation/state": np.linspace(0, 1, 8).astype(np.float32), "n": np.int64(3)}
    decoded, dialect = unpackb_dialect(openpi_msgpack.packb(obs))  # openpi's packer -> our reader
    assert dialect == "openpi" and decoded["prompt"] == "go" and decoded["n"] == 3
    np.testing.assert_array_equal(decoded["observation/image"], obs["observation/image"])
    assert decoded["observation/image"].flags.writeable
    back = openpi_msgpack.unpackb(packb({"actions": np.ones((H, 7), np.float32), "k": np.float32(2)}, "openpi"))
    assert back["actions"].shape == (H, 7) and back["actions"].dtype == np.float32 and back["k"] == 2.0
    assert unpackb_dialect(packb({"a": np.zeros(2)}))[1] == "toolkit"


@pytest.mark.parametrize("marker", [
    {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]},  # object dtype: never unpickled
    {b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]},  # truncated payload
    {b"__ndarray__": True, b"data": b"\0" * 4, b"dtype": "<f4", b"shape": [-1]},
    {b"__npgeneric__": True, b"data": {"x": 1}, b"dtype": "<i8"},
    {b"__npgeneric__": True, b"data": 1, b"dtype": "|O"},
])
def test_malformed_openpi_markers_refused(marker):
    import msgpack

    with pytest.raises(ProtocolError):
        unpackb(msgpack.packb({"observation/image": marker}, use_bin_type=True))


def test_real_openpi_client_against_our_server(policy):
    image, wrist = _image((64, 80, 3)), _image((32, 32, 3), seed=1)
    with PolicyServer(policy, "127.0.0.1", 0) as server:
        client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        try:
            meta = client.get_server_metadata()
            assert meta["horizon"] == H and meta["action_dim"] == 7
            obs = {"observation/image": image, "observation/wrist_image": wrist,
                   "observation/state": np.zeros(8, np.float32), "prompt": INSTR, "seed": 4}
            reply = client.infer(obs)
            expected = policy.predict_action_chunk({"image": image, "instruction": INSTR, "seed": 4})
            assert reply["actions"].shape == (H, 7) and reply["actions"].dtype == np.float32
            np.testing.assert_allclose(reply["actions"], expected["actions"], rtol=0, atol=1e-6)
            assert reply["server_timing"]["infer_ms"] > 0 and "prev_total_ms" not in reply["server_timing"]
            second = client.infer(obs)
            assert second["server_timing"]["prev_total_ms"] > 0  # as openpi's server reports it
            with pytest.raises(RuntimeError, match="prompt|instruction"):  # openpi's client: a text frame
                client.infer({"observation/image": image, "prompt": "   "})
            np.testing.assert_array_equal(client.infer(obs)["actions"], second["actions"])  # still connected
        finally:
            client._ws.close()


class _OpenpiStyleServer:
    """openpi's WebsocketPolicyServer handler (openpi/serving/websocket_policy_server.py), with openpi's packer."""

    def __init__(self, infer):
        self.infer, self.seen, self.port = infer, [], None
        self._ready, self._loop, self._stop = threading.Event(), None, None

    async def _handler(self, ws):
        packer = openpi_msgpack.Packer()
        await ws.send(packer.pack({"policy": "openpi-style", "action_horizon": H}))
        while True:
            try:
                obs = openpi_msgpack.unpackb(await ws.recv())
                self.seen.append(obs)
                action = self.infer(obs)
                action["server_timing"] = {"infer_ms": 1.0}
                await ws.send(packer.pack(action))
            except Exception as e:  # noqa: BLE001 - openpi sends the traceback as text, then closes
                if type(e).__name__.startswith("ConnectionClosed"):
                    break
                await ws.send(traceback.format_exc())
                await ws.close()
                break

    async def _serve(self):
        from websockets.asyncio.server import serve

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    def __enter__(self):
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _openpi_infer(obs):
    if obs["prompt"] == "explode":
        raise RuntimeError("boom in the openpi policy")
    base = float(obs["observation/image"].mean()) / 255 + float(np.sum(obs.get("observation/state", 0)))
    return {"actions": np.full((H, 7), base, np.float32)}


def test_our_client_against_an_openpi_server():
    image = np.full((16, 20, 3), 51, np.uint8)
    with _OpenpiStyleServer(_openpi_infer) as server:
        with PolicyClient("127.0.0.1", server.port, retry_until_up_s=5) as client:
            assert client.dialect == "openpi" and client.metadata["policy"] == "openpi-style"
            client.reset()  # openpi has no reset message: a no-op
            reply = client.infer({"image": image, "instruction": INSTR, "state": np.ones(8, np.float32), "seed": 3})
            np.testing.assert_allclose(reply["actions"], np.full((H, 7), 0.2 + 8, np.float32))
            assert reply["timing"]["infer_ms"] == 1.0 and reply["timing"]["roundtrip_ms"] > 0
            seen = server.seen[-1]
            assert set(seen) == {"observation/image", "observation/state", "prompt"}  # openpi's keys, no seed
            np.testing.assert_array_equal(seen["observation/image"], image)
            with pytest.raises(PolicyServerError, match="boom in the openpi policy"):
                client.infer({"image": image, "instruction": "explode"})
        with RemotePolicy("127.0.0.1", server.port, execute_steps=2, retry_until_up_s=5) as remote:
            remote.reset(INSTR)
            raw, _ = remote.step(image)
            np.testing.assert_allclose(raw["world_vector"], [0.2] * 3, rtol=1e-6)
            assert raw["terminate_episode"][0] == 0.0  # openpi replies carry no terminate
