"""Serve a policy over a websocket with msgpack messages (policies.protocol).

    python -m policies.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--device cuda]

Conversation, per connection:
1. the server sends a metadata dict: {"protocol_version", "max_message_bytes", "model_kind", "horizon",
   "action_dim", "image_size", ...} (the policy's own `metadata` merged with the server's);
2. the client sends requests, the server answers each in order:
   - {"type": "infer", "observation": {"image": (H, W, 3) uint8, "instruction": str, "seed": int | None}}
     (a request without "type" is an infer request; a bare observation dict, openpi style, is too)
     -> {"actions": (H, 7) float32, "terminate": (H,) float32, "timing": {"infer_ms", "server_ms"}}
   - {"type": "reset"} -> {"ok": True} (calls `policy.reset()` if the policy has one)
   - {"type": "metadata"} -> the metadata dict again
   Any failure (malformed msgpack, missing fields, bad image, an exception in the policy) is answered
   with {"error": message, "traceback": str}; the connection and the server stay up. A message larger
   than `max_message_bytes` closes that connection with code 1009 (message too big).
`GET /healthz` answers 200 "ok" over plain HTTP.

The duck-typed policy contract (anything that satisfies it can be served, no torch needed here):
- `policy.predict_action_chunk(observation: dict) -> chunk`, where `observation` is the validated
  dict above (image (H, W, 3) uint8 writable array, instruction str, seed int or None) and `chunk` is
  either an array (H, 7) of RT-1 actions [xyz, roll/pitch/yaw, gripper] in physical units, or a tuple
  `(actions (H, 7), terminate (H,))`, or a dict {"actions": (H, 7), "terminate": (H,)}. terminate holds
  1.0 where the policy asks to end the episode (or advance the subtask), 0.0 elsewhere; zeros if absent.
- `policy.metadata`: optional dict (JSON-like: str, numbers, lists) describing the model; keys used by
  clients: "horizon", "action_dim", "image_size", "model_kind", "execute_steps" (the recommended k).
- `policy.reset()`: optional; the policy is shared by all connections, so keep it per-request stateless.
Inference runs on one dedicated worker thread (requests from all connections are serialized there, and
CUDA graphs / compiled code always see the same thread); the event loop stays free for pings and /healthz.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http
import logging
import threading
import time
import traceback
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.server import ServerConnection, serve

from policies.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, packb, unpackb

log = logging.getLogger("policies.serve")


def validate_observation(obs: Any) -> dict[str, Any]:
    """Check an incoming observation; returns {"image", "instruction", "seed"[, "state"]} or raises ValueError.

    state (optional): (8,) or (T, 8) float proprioception read with the frame(s), RT-1's layout."""
    if not isinstance(obs, dict):
        raise ValueError(f"observation must be a dict with 'image' and 'instruction', got {type(obs).__name__}")
    missing = [k for k in ("image", "instruction") if k not in obs]
    if missing:
        raise ValueError(f"observation lacks {missing}; send {{'image': (H, W, 3) uint8, 'instruction': str}}")
    image, instruction, seed = obs["image"], obs["instruction"], obs.get("seed")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError("observation['image'] must be an (H, W, 3) uint8 RGB array (or (T, H, W, 3) recent frames, "
                         f"oldest first), got {desc}")
    if min(image.shape[:-1]) < 1:
        raise ValueError(f"observation['image'] is empty: shape {image.shape}")
    if not isinstance(instruction, str):
        raise ValueError(f"observation['instruction'] must be a str, got {type(instruction).__name__}")
    if (seed is not None and not isinstance(seed, (int, np.integer))) or isinstance(seed, bool):
        raise ValueError(f"observation['seed'] must be an int or None, got {seed!r}")
    out = {"image": image, "instruction": instruction, "seed": None if seed is None else int(seed)}
    state = obs.get("state")
    if state is not None:
        state = np.asarray(state) if isinstance(state, (np.ndarray, list, tuple)) else None
        frames = 1 if image.ndim == 3 else image.shape[0]
        if (state is None or state.dtype.kind not in "fiu" or state.shape[-1:] != (8,) or state.ndim > 2
                or (state.ndim == 2 and state.shape[0] != frames) or not np.all(np.isfinite(state))):
            raise ValueError(f"observation['state'] must be 8 finite floats per frame ((8,) or ({frames}, 8): tool "
                             "x y z, quaternion w x y z, gripper closedness), got "
                             f"{obs.get('state') if state is None else f'{state.dtype} array of shape {state.shape}'}")
        out["state"] = state.astype(np.float32)
    return out


def normalize_chunk(out: Any) -> tuple[np.ndarray, np.ndarray]:
    """A policy's predict_action_chunk output -> (actions (H, 7) float32, terminate (H,) float32)."""
    if isinstance(out, dict):
        actions, terminate = out.get("actions"), out.get("terminate")
    elif isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(f"predict_action_chunk returned a tuple of {len(out)}; expected (actions, terminate)")
        actions, terminate = out
    else:
        actions, terminate = out, None
    actions = np.asarray(actions, dtype=np.float32)
    if actions.ndim != 2 or actions.shape[1] != 7 or actions.shape[0] < 1:
        raise ValueError(f"predict_action_chunk must return actions of shape (H, 7), got {actions.shape}")
    if not np.all(np.isfinite(actions)):
        raise ValueError("predict_action_chunk returned non-finite actions")
    h = actions.shape[0]
    terminate = np.zeros(h, np.float32) if terminate is None else np.asarray(terminate, np.float32).reshape(-1)
    if terminate.shape != (h,):
        raise ValueError(f"terminate must have shape ({h},) to match the actions, got {terminate.shape}")
    return actions, terminate


class PolicyServer:
    """Websocket + msgpack server around any object with `predict_action_chunk` (see module docstring).

    `port=0` picks a free port; read `.port` after `start()`. Use `serve_forever()` in a script, or
    `start()` / `stop()` (or `with PolicyServer(...)`) to run it on a background thread.
    """

    def __init__(self, policy: Any, host: str = "127.0.0.1", port: int = 8000, metadata: dict | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        if not callable(getattr(policy, "predict_action_chunk", None)):
            raise ValueError(f"{type(policy).__name__} has no predict_action_chunk(observation) method; "
                             "see policies/serve.py's docstring for the contract")
        self.policy, self.host, self.port = policy, host, int(port)
        self.max_message_bytes = int(max_message_bytes)
        self.metadata = {"protocol_version": PROTOCOL_VERSION, "max_message_bytes": self.max_message_bytes,
                         **dict(getattr(policy, "metadata", None) or {}), **(metadata or {})}
        packb(self.metadata)  # fail now, not on the first connection, if metadata cannot travel
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy-infer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- request handling
    def _handle_sync(self, request: Any, t_recv: float) -> dict[str, Any]:
        """One decoded request -> reply dict (runs on the inference thread)."""
        if not isinstance(request, dict):
            raise ValueError(f"a request must be a dict, got {type(request).__name__}")
        kind = request.get("type", "infer")
        if kind == "reset":
            if callable(getattr(self.policy, "reset", None)):
                self.policy.reset()
            return {"ok": True}
        if kind == "metadata":
            return dict(self.metadata)
        if kind != "infer":
            raise ValueError(f"unknown request type {kind!r}; use 'infer', 'reset' or 'metadata'")
        obs = validate_observation(request["observation"] if "observation" in request else request)
        t0 = time.perf_counter()
        actions, terminate = normalize_chunk(self.policy.predict_action_chunk(obs))
        t1 = time.perf_counter()
        return {"actions": actions, "terminate": terminate,
                "timing": {"infer_ms": (t1 - t0) * 1e3, "server_ms": (t1 - t_recv) * 1e3}}

    async def _handler(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            await ws.send(packb(self.metadata))
            async for message in ws:
                t_recv = time.perf_counter()
                try:
                    request = unpackb(message)
                    reply = await loop.run_in_executor(self._executor, self._handle_sync, request, t_recv)
                    if "timing" in reply:  # server_ms covers decode + queueing + inference
                        reply["timing"]["server_ms"] = (time.perf_counter() - t_recv) * 1e3
                    payload = packb(reply)
                except Exception as e:  # answered to the client; the server keeps going
                    log.warning("request failed: %s: %s", type(e).__name__, e)
                    payload = packb({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
                await ws.send(payload)
        except websockets.exceptions.ConnectionClosed as e:  # client gone, or its message was too big (1009)
            log.info("connection from %s closed: %s", ws.remote_address, e)

    @staticmethod
    def _process_request(connection: ServerConnection, request) -> Any:
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        return None  # carry on with the websocket handshake

    # ---------------------------------------------------------------- lifecycle
    async def _serve(self) -> None:
        if self.host in ("0.0.0.0", "::", ""):
            log.warning("binding %r exposes the policy server to every network interface; it has no "
                        "authentication. Use --host 127.0.0.1 unless you mean it.", self.host)
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve(self._handler, self.host, self.port, max_size=self.max_message_bytes, compression=None,
                         process_request=self._process_request, ping_interval=20, ping_timeout=60) as server:
            self.port = server.sockets[0].getsockname()[1]
            log.info("policy server on ws://%s:%d (healthz: http://%s:%d/healthz)", self.host, self.port,
                     self.host, self.port)
            self._ready.set()
            await self._stop.wait()

    def serve_forever(self) -> None:
        """Run in the calling thread until interrupted."""
        try:
            asyncio.run(self._serve())
        finally:
            self._executor.shutdown(wait=False)

    def start(self, timeout: float = 10.0) -> PolicyServer:
        """Run on a daemon thread; returns once the port is bound (raises if binding failed)."""
        def run():
            try:
                asyncio.run(self._serve())
            except BaseException as e:  # surfaced by start()
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=run, name="policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"policy server did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"policy server failed to start on {self.host}:{self.port}: {self._error}") \
                from self._error
        return self

    def stop(self) -> None:
        """Stop a server started with `start()`."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._executor.shutdown(wait=False)

    def __enter__(self) -> PolicyServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve a SelfFlowPolicy checkpoint over websocket + msgpack.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: the policy's)")
    p.add_argument("--max-message-mb", type=float, default=MAX_MESSAGE_BYTES / 2**20)
    p.add_argument("--no-warmup", action="store_true", help="skip the dummy inference (compilation) before serving")
    p.add_argument("--compile", action="store_true", help="CUDA: bf16, compiled backbone, one CUDA graph per chunk")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from policies import SelfFlowPolicy  # torch is imported here only

    kwargs = ({} if args.device is None else {"device": args.device}) | ({"compile": True} if args.compile else {})
    policy = SelfFlowPolicy.from_pretrained(args.checkpoint, **kwargs)
    if not args.no_warmup:  # compile / capture before the first client waits on it
        size = (getattr(policy, "metadata", None) or {}).get("image_size") or (256, 320)  # (H, W) or one int
        h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        t0 = time.perf_counter()
        policy.predict_action_chunk({"image": np.zeros((h, w, 3), np.uint8), "instruction": "warm up", "seed": 0})
        log.info("warm-up inference took %.1f s", time.perf_counter() - t0)
    server = PolicyServer(policy, args.host, args.port, metadata={"checkpoint": str(args.checkpoint)},
                          max_message_bytes=int(args.max_message_mb * 2**20))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
