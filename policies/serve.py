"""Serve a policy over a websocket with msgpack messages (policies.protocol).

    python -m policies.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--device cuda]
                             [--max-batch 16] [--max-wait-ms 2] [--debug]

Conversation, per connection:
1. the server sends a metadata dict: {"protocol_version", "max_message_bytes", "model_kind", "horizon",
   "action_dim", "image_size", "batching", "limits", ...} (the policy's own `metadata` merged with the server's);
2. the client sends requests, the server answers each in order:
   - {"type": "infer", "observation": {"image": (H, W, 3) uint8, "instruction": str, "seed": int | None}}
     (a request without "type" is an infer request; a bare observation dict, openpi style, is too)
     -> {"actions": (H, 7) float32, "terminate": (H,) float32, "timing": {"infer_ms", "server_ms",
     "batch_size"}, "server_timing": {"infer_ms", "prev_total_ms"?}}
   - {"type": "reset"} -> {"ok": True} (calls `policy.reset()` if the policy has one)
   - {"type": "metadata"} -> the metadata dict again
   Any failure (malformed msgpack, missing fields, bad image, an exception in the policy) is answered
   with {"error": message} (cut to a few hundred characters; "traceback" too only with --debug); the
   traceback goes to the server log; the connection and the server stay up. A message larger than
   `max_message_bytes` closes that connection with code 1009 (message too big).
openpi: `openpi_client.websocket_client_policy.WebsocketClientPolicy` works as is. Its arrays are marked
with bytes keys; a request in that dialect is answered in it ({"actions", "terminate", "server_timing"}),
and its errors come back as a text frame (openpi's client raises RuntimeError on one). Observation keys
"observation/image", "observation/wrist_image" (checked, unused), "observation/state" and "prompt" are read.
Batching: requests from all connections go to one worker thread, which gathers up to `max_batch` of them
(waiting at most `max_wait_ms` after the first, and only while fewer requests than open connections are
in hand: a lone client never waits) into one `predict_action_chunk(list)` call when the policy
says `batched_inference = True`, else one call each. Each request keeps its seed; an error in one is
answered to that request only (a failing batch is re-run one request at a time to find it).
Bounds: every observation is checked before it is queued (policies.validation: pixels, frames, aspect,
instruction length), at most `max_pending` requests wait, and a message is at most `max_message_bytes`.
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
- `policy.batched_inference`: optional; True when `predict_action_chunk(list of observations)` returns a list
  of chunks from one batched call (SelfFlowPolicy does).
Inference runs on one dedicated worker thread (requests from all connections are serialized there, and
CUDA graphs / compiled code always see the same thread); the event loop stays free for pings and /healthz.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import logging
import threading
import time
import traceback
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.server import ServerConnection, serve

from policies.batching import RequestBatcher, ServerBusy
from policies.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, packb, unpackb_dialect
from policies.validation import DEFAULT_LIMITS, Limits, short
from policies.validation import validate_observation as _validate

log = logging.getLogger("policies.serve")


def validate_observation(obs: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Check an incoming observation (policies.validation); returns {"image", "instruction", "seed"[, "state"]}
    or raises ValueError. state (optional): (8,) or (T, 8) float proprioception read with the frame(s)."""
    out = _validate(obs, limits)
    if out["state"] is None:
        del out["state"]  # a policy without proprioception never sees the key
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
    max_batch / max_wait_ms: how many concurrent requests one batched call takes, and how long the worker
    waits for more after the first; limits: bounds on one observation; max_pending: requests allowed to wait;
    debug: send tracebacks to clients (they always go to the server log).
    """

    def __init__(self, policy: Any, host: str = "127.0.0.1", port: int = 8000, metadata: dict | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, max_batch: int = 16, max_wait_ms: float = 2.0,
                 limits: Limits | None = None, max_pending: int = 1024, debug: bool = False):
        if not callable(getattr(policy, "predict_action_chunk", None)):
            raise ValueError(f"{type(policy).__name__} has no predict_action_chunk(observation) method; "
                             "see policies/serve.py's docstring for the contract")
        self.policy, self.host, self.port = policy, host, int(port)
        self.max_message_bytes, self.debug = int(max_message_bytes), bool(debug)
        self.limits = limits or getattr(policy, "limits", None) or DEFAULT_LIMITS
        self.batched = bool(getattr(policy, "batched_inference", False))
        self.metadata = {"protocol_version": PROTOCOL_VERSION, "max_message_bytes": self.max_message_bytes,
                         "batching": {"max_batch": int(max_batch), "max_wait_ms": float(max_wait_ms),
                                      "batched_inference": self.batched},
                         "limits": dict(vars(self.limits)),
                         **dict(getattr(policy, "metadata", None) or {}), **(metadata or {})}
        packb(self.metadata)  # fail now, not on the first connection, if metadata cannot travel
        self.connections = 0  # open websocket connections: a batch waits for at most this many requests
        wait_s = max_wait_ms / 1e3 if self.batched else 0.0  # one call per request anyway: never wait
        self.batcher = RequestBatcher(self._infer_batch, max_batch, wait_s, max_pending,
                                      enough=lambda: self.connections)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- inference (the batcher's thread)
    def _infer_batch(self, observations: list[dict]) -> list:
        """B validated observations -> B results (actions, terminate, {"infer_ms", "batch_size"}) or exceptions.

        A batch-capable policy gets one call; if that call fails, each request is re-run alone so that only
        the failing ones get an error. Other policies get one call per request."""
        t0 = time.perf_counter()
        if self.batched and len(observations) > 1:
            try:
                outs = self.policy.predict_action_chunk(observations)
                if not isinstance(outs, (list, tuple)) or len(outs) != len(observations):
                    raise ValueError(f"predict_action_chunk(list) returned {type(outs).__name__}, not one chunk "
                                     f"per observation ({len(observations)})")
            except Exception as e:  # noqa: BLE001 - isolate the failing request(s) below
                log.info("batch of %d failed (%s); answering its requests one by one", len(observations),
                         short(f"{type(e).__name__}: {e}"))
            else:
                infer_ms = (time.perf_counter() - t0) * 1e3
                return [self._result(lambda o=o: o, infer_ms, len(outs)) for o in outs]
        results = []
        for obs in observations:
            t1 = time.perf_counter()
            result = self._result(lambda obs=obs: self.policy.predict_action_chunk(obs), None, 1)
            if not isinstance(result, Exception):
                result[2]["infer_ms"] = (time.perf_counter() - t1) * 1e3
            results.append(result)
        return results

    @staticmethod
    def _result(produce, infer_ms: float | None, batch_size: int):
        try:
            actions, terminate = normalize_chunk(produce())
        except Exception as e:  # noqa: BLE001 - this request's answer
            return e
        return actions, terminate, {"infer_ms": infer_ms, "batch_size": batch_size}

    def _reset_policy(self) -> dict:
        if callable(getattr(self.policy, "reset", None)):
            self.policy.reset()
        return {"ok": True}

    # ---------------------------------------------------------------- request handling (the event loop)
    async def _answer(self, request: Any, t_recv: float) -> dict[str, Any]:
        """One decoded request -> reply dict."""
        if not isinstance(request, dict):
            raise ValueError(f"a request must be a dict, got {type(request).__name__}")
        kind = request.get("type", "infer")
        if kind == "reset":
            return await asyncio.wrap_future(self.batcher.call(self._reset_policy))
        if kind == "metadata":
            return dict(self.metadata)
        if kind != "infer":
            raise ValueError(f"unknown request type {short(repr(kind), 80)}; use 'infer', 'reset' or 'metadata'")
        obs = validate_observation(request["observation"] if "observation" in request else request, self.limits)
        try:
            actions, terminate, timing = await asyncio.wrap_future(self.batcher.submit(obs))
        except ValueError as e:  # raised by the policy: logged with its traceback, not as a refused request
            e.raised_by_policy = True
            raise
        timing["server_ms"] = (time.perf_counter() - t_recv) * 1e3  # decode + queueing + inference
        return {"actions": actions, "terminate": terminate, "timing": timing,
                "server_timing": {"infer_ms": timing["infer_ms"]}}

    def _error_payload(self, e: Exception, dialect: str) -> bytes | str:
        """The error answer: the message (cut short), the traceback only with debug; the log gets both."""
        message = short(f"{type(e).__name__}: {e}")
        # the request's fault (or the load): logged without a traceback
        client_error = isinstance(e, (ValueError, ServerBusy)) and not getattr(e, "raised_by_policy", False)
        trace = short(traceback.format_exc(), 20_000)
        if client_error:
            log.warning("request refused: %s", message)
        else:
            log.error("request failed: %s\n%s", message, trace)
        if dialect == "openpi":  # openpi's client raises RuntimeError on a text frame
            return message + (f"\n{trace}" if self.debug else "")
        return packb({"error": message, **({"traceback": trace} if self.debug else {})})

    async def _handler(self, ws: ServerConnection) -> None:
        prev_total_ms = None
        self.connections += 1
        try:
            await ws.send(packb(self.metadata))
            async for message in ws:
                t_recv, dialect = time.perf_counter(), "toolkit"
                try:
                    request, dialect = unpackb_dialect(message)
                    reply = await self._answer(request, t_recv)
                    if "server_timing" in reply and prev_total_ms is not None:
                        reply["server_timing"]["prev_total_ms"] = prev_total_ms
                    payload = packb(reply, dialect)
                except Exception as e:  # answered to the client; the server keeps going
                    payload = self._error_payload(e, dialect)
                await ws.send(payload)
                prev_total_ms = (time.perf_counter() - t_recv) * 1e3
        except websockets.exceptions.ConnectionClosed as e:  # client gone, or its message was too big (1009)
            log.info("connection from %s closed: %s", ws.remote_address, short(e))
        finally:
            self.connections -= 1

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
            self.batcher.close(timeout=1.0)

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
        self.batcher.close(timeout=1.0)

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
    p.add_argument("--max-batch", type=int, default=16, help="most concurrent requests run as one batched call")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long the worker waits for more requests after the first of a batch")
    p.add_argument("--max-pending", type=int, default=1024, help="requests allowed to wait; beyond: 'busy' errors")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_LIMITS.max_pixels, help="largest H * W per frame")
    p.add_argument("--debug", action="store_true", help="send tracebacks to clients (always in the server log)")
    p.add_argument("--no-warmup", action="store_true", help="skip the dummy inference (compilation) before serving")
    p.add_argument("--compile", action="store_true", help="CUDA: bf16, compiled backbone, one CUDA graph per chunk")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from dataclasses import replace

    from policies import SelfFlowPolicy  # torch is imported here only

    limits = replace(DEFAULT_LIMITS, max_pixels=args.max_pixels)
    kwargs = {"limits": limits} if args.device is None else {"device": args.device, "limits": limits}
    if args.compile:
        kwargs["compile"] = True
    policy = SelfFlowPolicy.from_pretrained(args.checkpoint, **kwargs)
    server = PolicyServer(policy, args.host, args.port, metadata={"checkpoint": str(args.checkpoint)},
                          max_message_bytes=int(args.max_message_mb * 2**20), max_batch=args.max_batch,
                          max_wait_ms=args.max_wait_ms, limits=limits, max_pending=args.max_pending, debug=args.debug)
    if not args.no_warmup:  # compile / capture on the inference thread before the first client waits on it
        size = (getattr(policy, "metadata", None) or {}).get("image_size") or (256, 320)  # (H, W) or one int
        h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        t0 = time.perf_counter()
        obs = {"image": np.zeros((h, w, 3), np.uint8), "instruction": "warm up", "seed": 0}
        server.batcher.call(lambda: policy.predict_action_chunk(obs)).result()
        log.info("warm-up inference took %.1f s", time.perf_counter() - t0)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
