"""policies.serve + policies.client on localhost with a small deterministic numpy policy."""

import http.client
import socket
import threading

import numpy as np
import pytest
from policy_doubles import H, LinePolicy
from websockets.sync.client import connect

from policies.client import PolicyClient, PolicyServerError, RemotePolicy
from policies.conventions import to_simpler_action
from policies.protocol import PROTOCOL_VERSION, packb, unpackb
from policies.serve import PolicyServer


def _image(value=100, shape=(32, 40, 3)):
    return np.full(shape, value, np.uint8)


@pytest.fixture(scope="module")
def server():
    policy = LinePolicy()
    with PolicyServer(policy, "127.0.0.1", 0, metadata={"extra": "yes"}, max_message_bytes=200_000) as srv:
        yield srv


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metadata_on_connect(server):
    with PolicyClient("127.0.0.1", server.port) as c:
        md = c.metadata
    assert md["protocol_version"] == PROTOCOL_VERSION and md["max_message_bytes"] == 200_000
    assert md["model_kind"] == "test-line" and md["horizon"] == H and md["extra"] == "yes"


def test_infer_round_trip_and_timing(server):
    obs = {"image": _image(51), "instruction": "pick coke can", "seed": 3}
    with PolicyClient("127.0.0.1", server.port) as c:
        reply = c.infer(obs)
    actions, terminate = LinePolicy.expected(obs)
    assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (H, 7)
    np.testing.assert_array_equal(reply["actions"], actions)
    np.testing.assert_array_equal(reply["terminate"], terminate)
    t = reply["timing"]
    assert t["infer_ms"] >= 2.0 and t["server_ms"] >= t["infer_ms"] and t["roundtrip_ms"] >= t["server_ms"]


def test_openpi_style_bare_observation_and_text_frame(server):
    obs = {"image": _image(7), "instruction": "stop"}
    with connect(f"ws://127.0.0.1:{server.port}", compression=None, proxy=None) as ws:
        assert unpackb(ws.recv(timeout=5))["protocol_version"] == PROTOCOL_VERSION
        ws.send(packb(obs))  # no "type", no "observation" wrapper
        reply = unpackb(ws.recv(timeout=5))
        np.testing.assert_array_equal(reply["terminate"], LinePolicy.expected(obs)[1])
        ws.send(packb({"observation": obs}))  # no "type"
        assert "actions" in unpackb(ws.recv(timeout=5))
        ws.send("a text frame")
        assert "binary" in unpackb(ws.recv(timeout=5))["error"]


def test_survives_garbage_then_answers(server):
    with connect(f"ws://127.0.0.1:{server.port}", compression=None, proxy=None) as ws:
        ws.recv(timeout=5)
        ws.send(b"\xc1\xff garbage, not msgpack \x00")
        err = unpackb(ws.recv(timeout=5))
        assert "malformed msgpack" in err["error"] and "traceback" not in err  # tracebacks only with debug
        ws.send(packb({"type": "infer", "observation": {"image": _image(), "instruction": "go"}}))
        assert unpackb(ws.recv(timeout=5))["actions"].shape == (H, 7)
    with PolicyClient("127.0.0.1", server.port) as c:  # the server is still fine for others
        assert c.infer({"image": _image(), "instruction": "go"})["actions"].shape == (H, 7)


@pytest.mark.parametrize("obs, match", [
    ({"instruction": "go"}, "lacks \\['image'\\]"),
    ({"image": _image()}, "lacks \\['instruction'\\]"),
    ({"image": np.zeros((32, 40, 3), np.float32), "instruction": "go"}, "uint8"),
    ({"image": np.zeros((32, 40), np.uint8), "instruction": "go"}, r"\(H, W, 3\)"),
    ({"image": _image(), "instruction": 5}, "must be a str"),
    ({"image": _image(), "instruction": "go", "seed": "x"}, "seed"),
    ({"image": _image(), "instruction": "explode"}, "boom in the policy"),
    ({"image": _image(), "instruction": "bad shape"}, r"\(H, 7\)"),
])
def test_bad_requests_come_back_as_errors(server, obs, match):
    with PolicyClient("127.0.0.1", server.port) as c:
        with pytest.raises(PolicyServerError, match=match) as ei:
            c.infer(obs)
        assert ei.value.remote_traceback == ""  # the server log has it; clients get it only with debug=True
        assert c.infer({"image": _image(), "instruction": "go"})["actions"].shape == (H, 7)  # same connection


def test_unknown_type_and_reset(server):
    with PolicyClient("127.0.0.1", server.port) as c:
        with pytest.raises(PolicyServerError, match="unknown request type"):
            c._request({"type": "fly"})
        before = server.policy.resets
        c.reset()
        assert server.policy.resets == before + 1


def test_healthz(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read().strip() == b"ok"
    conn.close()


def test_oversize_message_refused(server):
    big = {"image": _image(shape=(300, 300, 3)), "instruction": "go"}  # 270 kB > the 200 kB limit
    with PolicyClient("127.0.0.1", server.port) as c:
        with pytest.raises(ValueError, match="exceeds the server's limit"):  # refused before sending
            c.infer(big)
    with connect(f"ws://127.0.0.1:{server.port}", compression=None, proxy=None, max_size=None) as ws:
        ws.recv(timeout=5)
        ws.send(packb({"type": "infer", "observation": big}))  # bypass the client's check
        with pytest.raises(Exception) as ei:
            ws.recv(timeout=5)
        assert "1009" in str(ei.value) or "too big" in str(ei.value)
    with PolicyClient("127.0.0.1", server.port) as c:  # the server survives
        assert c.infer({"image": _image(), "instruction": "go"})["actions"].shape == (H, 7)


def test_client_retries_until_up_and_fails_clearly():
    port = _free_port()
    with pytest.raises(ConnectionError, match="python -m policies.serve"):
        PolicyClient("127.0.0.1", port, retry_until_up_s=0.3)
    srv = PolicyServer(LinePolicy(tuple_output=False), "127.0.0.1", port)
    timer = threading.Timer(0.5, srv.start)
    timer.start()
    try:
        with PolicyClient("127.0.0.1", port, retry_until_up_s=15) as c:
            reply = c.infer({"image": _image(), "instruction": "go"})
        np.testing.assert_array_equal(reply["terminate"], np.zeros(H))  # array-only policy: terminate zeros
    finally:
        timer.join()
        srv.stop()


def test_server_refuses_non_policy():
    with pytest.raises(ValueError, match="predict_action_chunk"):
        PolicyServer(object(), "127.0.0.1", 0)


def _expected_rows(image, instruction, seed=None):
    obs = {"image": image, "instruction": instruction, "seed": seed}
    a, t = LinePolicy.expected(obs)
    return a.astype(np.float64), t


def test_remote_policy_action_queue(server):
    pol = RemotePolicy("127.0.0.1", server.port, execute_steps=2)
    try:
        pol.reset("go")
        calls0 = server.policy.calls
        images = [_image(10 * i) for i in range(5)]
        for i, img in enumerate(images):
            raw, action = pol.step(img, "go")
            chunk_start = (i // 2) * 2  # chunks queried at steps 0, 2, 4
            rows, _ = _expected_rows(images[chunk_start], "go")
            a7 = rows[i - chunk_start]
            np.testing.assert_allclose(raw["world_vector"], a7[:3], rtol=1e-6)
            ref = to_simpler_action(a7, 0.0)
            for k in ref:
                np.testing.assert_allclose(action[k], ref[k], rtol=1e-5, atol=1e-7)
        assert server.policy.calls - calls0 == 3 and pol.n_requests == 3
        assert pol.last_timing["roundtrip_ms"] > 0
        # a new instruction (next subtask) replans immediately; terminate comes through
        pol.step(_image(), "go")  # queue now holds one action
        calls1 = server.policy.calls
        terms = [pol.step(_image(), "stop")[1]["terminate_episode"][0] for _ in range(4)]
        assert server.policy.calls - calls1 == 2 and terms == [0.0, 1.0, 0.0, 1.0]
    finally:
        pol.close()


def test_remote_policy_ensemble_and_seed(server):
    with RemotePolicy("127.0.0.1", server.port, ensemble=True, ensemble_coeff=0.0, seed=10) as pol:
        pol.reset("go")
        calls0 = server.policy.calls
        img0, img1 = _image(0), _image(255)
        pol.step(img0, "go")
        raw, _ = pol.step(img1, "go")
        r0, _ = _expected_rows(img0, "go", seed=10)
        r1, _ = _expected_rows(img1, "go", seed=11)
        np.testing.assert_allclose(raw["world_vector"], (r0[1, :3] + r1[0, :3]) / 2, rtol=1e-6)
        assert server.policy.calls - calls0 == 2
    with pytest.raises(ValueError, match="either"):
        RemotePolicy("127.0.0.1", server.port, execute_steps=2, ensemble=True)


def test_client_side_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, policies, policies.client, policies.serve, policies.chunking, policies.protocol; "
            "assert 'torch' not in sys.modules, 'torch imported'; assert callable(policies.RemotePolicy)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
