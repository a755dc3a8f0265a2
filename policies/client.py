"""Client of the policy server (policies/serve.py): numpy + msgpack + websockets only, no torch.

Importable in the simulator's own environment (SimplerEnv pins numpy < 2 and sapien 2.2.2):

    from policies.client import RemotePolicy
    policy = RemotePolicy("127.0.0.1", 8000, execute_steps=4)   # or ensemble=True
    policy.reset(instruction)
    raw_action, action = policy.step(image, instruction)       # SIMPLER's Google-robot action dict

`PolicyClient` is the plain request/response layer: `infer(observation) -> {"actions", "terminate",
"timing"}`, `reset()`, `.metadata`. It also talks to an openpi policy server (openpi's
`serve_policy.py`): a server whose first message has no "protocol_version" is spoken to in openpi's
dialect (bytes-keyed msgpack-numpy, bare observations with openpi's keys "observation/image",
"observation/state", "prompt"; its "server_timing" is read as the timing; reset is a no-op there, and
seeds are not sent, openpi has none). `.dialect` says which ("toolkit" or "openpi").
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import connect

from policies.conventions import GRIPPER_DEADZONE
from policies.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, packb, unpackb
from policies.stepper import ChunkedPolicy
from policies.validation import OPENPI_KEYS

TO_OPENPI_KEYS = {ours: theirs for theirs, ours in OPENPI_KEYS.items()}  # our keys -> openpi's

# websockets >= 15 routes connections through $HTTP(S)_PROXY by default; a policy server never wants that.
_NO_PROXY = {"proxy": None} if "proxy" in inspect.signature(connect).parameters else {}


class PolicyServerError(RuntimeError):
    """The server answered a request with an error; `.remote_traceback` holds its traceback."""

    def __init__(self, message: str, remote_traceback: str = ""):
        trace = f"\n--- server traceback ---\n{remote_traceback}".rstrip() if remote_traceback else ""
        super().__init__(f"policy server error: {message}{trace}")
        self.remote_message, self.remote_traceback = message, remote_traceback


class PolicyClient:
    """Synchronous websocket client; connects (retrying up to `retry_until_up_s`) on construction.

    `timeout` bounds each reply wait in seconds (the first inference may compile the model: be generous).
    A dropped connection raises ConnectionError; the next call reconnects.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, timeout: float = 120.0,
                 retry_until_up_s: float = 60.0, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.host, self.port, self.timeout = host, int(port), float(timeout)
        self.retry_until_up_s, self.max_message_bytes = float(retry_until_up_s), int(max_message_bytes)
        self.uri = f"ws://{host}:{self.port}"
        self._ws = None
        self.metadata: dict[str, Any] = {}
        self.dialect = "toolkit"
        self._connect()

    def _connect(self) -> None:
        deadline = time.monotonic() + self.retry_until_up_s
        while True:
            try:
                ws = connect(self.uri, open_timeout=min(10.0, max(self.timeout, 1.0)), compression=None,
                             max_size=self.max_message_bytes, **_NO_PROXY)
                break
            except InvalidURI as e:
                raise ValueError(f"bad policy server address {self.uri!r}: give a host name and port") from e
            except (OSError, InvalidHandshake, TimeoutError) as e:
                if time.monotonic() >= deadline:
                    raise ConnectionError(
                        f"no policy server at {self.uri} after {self.retry_until_up_s:.0f} s ({type(e).__name__}: "
                        f"{e}); start one with `python -m policies.serve --checkpoint DIR --port {self.port}` or "
                        "raise retry_until_up_s") from e
                time.sleep(0.25)
        try:
            metadata = unpackb(ws.recv(timeout=self.timeout))
        except BaseException:
            ws.close()
            raise
        version = metadata.get("protocol_version") if isinstance(metadata, dict) else None
        if not isinstance(metadata, dict) or version not in (None, PROTOCOL_VERSION):
            ws.close()
            raise ConnectionError(f"{self.uri} is not a policy server speaking protocol {PROTOCOL_VERSION} "
                                  f"(first message: {str(metadata)[:200]}); update the client or the server")
        self.dialect = "toolkit" if version == PROTOCOL_VERSION else "openpi"  # openpi servers send no version
        self._ws, self.metadata = ws, metadata

    def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._ws is None:
            self._connect()
        if self.dialect == "openpi":  # a bare observation with openpi's keys; openpi has no seed
            if request.get("type") != "infer":
                raise ValueError(f"an openpi server answers observations only, not {request.get('type')!r}")
            obs = request["observation"]
            request = {TO_OPENPI_KEYS.get(k, k): v for k, v in obs.items() if k != "seed"}
        payload = packb(request, self.dialect)
        limit = int(self.metadata.get("max_message_bytes", self.max_message_bytes))
        if len(payload) > limit:
            raise ValueError(f"request of {len(payload)} bytes exceeds the server's limit of {limit}; send a smaller "
                             "image or start the server with a larger --max-message-mb")
        try:
            self._ws.send(payload)
            reply = self._ws.recv(timeout=self.timeout)
            if isinstance(reply, str):  # openpi servers answer errors with a text frame
                raise PolicyServerError(reply[:2000])
            reply = unpackb(reply)
        except ConnectionClosed as e:
            self._ws = None
            raise ConnectionError(f"policy server {self.uri} closed the connection ({e}); the next call "
                                  "reconnects") from e
        except TimeoutError as e:
            self.close()  # a late reply would be read as the answer to the next request
            raise TimeoutError(f"no reply from {self.uri} within {self.timeout} s; raise `timeout` if the model "
                               "is slow (e.g. compiling on its first call)") from e
        if not isinstance(reply, dict):
            raise PolicyServerError(f"unexpected reply of type {type(reply).__name__}")
        if "error" in reply:
            raise PolicyServerError(str(reply["error"]), str(reply.get("traceback", "")))
        return reply

    def infer(self, observation: dict[str, Any]) -> dict[str, Any]:
        """{"image": (H, W, 3) uint8, "instruction": str, "seed"?} -> {"actions" (H, 7), "terminate" (H,), "timing"}.

        timing gets "roundtrip_ms" (client send to reply decoded) beside the server's infer_ms / server_ms.
        """
        t0 = time.perf_counter()
        reply = self._request({"type": "infer", "observation": observation})
        timing = reply.setdefault("timing", dict(reply.get("server_timing") or {}))
        timing["roundtrip_ms"] = (time.perf_counter() - t0) * 1e3
        return reply

    def reset(self) -> None:
        """Ask the server to reset the policy (a no-op for stateless policies and for openpi servers)."""
        if self.dialect == "toolkit":
            self._request({"type": "reset"})

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemotePolicy(ChunkedPolicy):
    """A SIMPLER-style policy (`reset(instruction)`, `step(image, instruction)`) backed by a policy server.

    Chunks come from the server; `execute_steps=k` runs the first k actions of each chunk (default: the
    server's metadata "execute_steps", else the whole chunk); `ensemble=True` queries every step and
    averages overlapping chunks (TemporalEnsembler, weights exp(-ensemble_coeff * i), i = 0 oldest).
    The recent frames the model conditions on (the last (context_frames - 1) * frame_stride + 1, from the
    metadata) are kept here and sent with each request, so the server stays stateless.
    `seed`: if given, request n is sampled with seed + n (reproducible rollouts).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, execute_steps: int | None = None,
                 ensemble: bool = False, ensemble_coeff: float = 0.01, sticky_gripper: int = 1,
                 gripper_deadzone: float = GRIPPER_DEADZONE, seed: int | None = None, timeout: float = 120.0,
                 retry_until_up_s: float = 60.0):
        self.client = PolicyClient(host, port, timeout=timeout, retry_until_up_s=retry_until_up_s)
        self.metadata = self.client.metadata
        if execute_steps is None and not ensemble:
            execute_steps = self.metadata.get("execute_steps")
        super().__init__(execute_steps, ensemble, ensemble_coeff, sticky_gripper, gripper_deadzone,
                         context_frames=int(self.metadata.get("context_frames", 1)),
                         frame_stride=int(self.metadata.get("frame_stride", 1)))
        self.seed = seed
        self.n_requests, self.last_timing = 0, {}

    def reseed(self, seed: int) -> None:
        """Seed this episode's requests: request n is sampled with seed * 100_003 + n."""
        self.seed, self.n_requests = int(seed) * 100_003, 0

    def reset(self, instruction: str | None = None) -> None:
        """Start an episode: drop frames and queued/ensembled actions, and reset the server-side policy."""
        super().reset(instruction)
        self.client.reset()

    def _query(self, frames: np.ndarray, instruction: str, states: np.ndarray | None = None) -> np.ndarray:
        """One server call -> chunk (H, 8): 7 action columns + terminate."""
        image = frames[-1] if len(frames) == 1 else frames  # (H, W, 3) or (T, H, W, 3) recent frames, oldest first
        obs = {"image": np.ascontiguousarray(image), "instruction": instruction,
               "seed": None if self.seed is None else self.seed + self.n_requests}
        if states is not None:  # (Tc, 8) read with the frames
            obs["state"] = np.ascontiguousarray(states[-1] if len(frames) == 1 else states, dtype=np.float32)
        reply = self.client.infer(obs)
        self.n_requests += 1
        self.last_timing = reply.get("timing", {})
        actions = np.asarray(reply["actions"], np.float64)  # (H, 7)
        terminate = np.asarray(reply.get("terminate", np.zeros(len(actions))), np.float64).reshape(-1, 1)  # (H, 1)
        return np.concatenate([actions, terminate], axis=1)  # (H, 8)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
