"""Round-trip latency of the policy transport alone (websocket + msgpack), no model.

    python benchmarks/bench_serve.py                          # 256x320 image, server in a subprocess
    python benchmarks/bench_serve.py --image 512 640 --n 300  # SIMPLER's native frame
    python benchmarks/bench_serve.py --in-process             # server on a thread (shares the GIL)
Prints one JSON object: round trip / server / encode+decode times in ms (mean, p50, p90, p99) and bytes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.client import PolicyClient  # noqa: E402
from policies.protocol import packb, unpackb  # noqa: E402
from policies.serve import PolicyServer  # noqa: E402


class FixedChunkPolicy:
    """Returns the same (H, 7) chunk every call: the transport is all that is measured."""

    def __init__(self, horizon: int = 16):
        self.chunk = np.linspace(-1, 1, horizon * 7, dtype=np.float32).reshape(horizon, 7)  # (H, 7)
        self.metadata = {"model_kind": "fixed-chunk", "horizon": horizon, "action_dim": 7}

    def predict_action_chunk(self, observation):
        return self.chunk, np.zeros(len(self.chunk), np.float32)


def _serve(port: int, horizon: int) -> None:
    PolicyServer(FixedChunkPolicy(horizon), "127.0.0.1", port).serve_forever()


def _stats(x: list[float]) -> dict[str, float]:
    a = np.asarray(x)
    return {"mean": round(float(a.mean()), 3), "p50": round(float(np.percentile(a, 50)), 3),
            "p90": round(float(np.percentile(a, 90)), 3), "p99": round(float(np.percentile(a, 99)), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=int, nargs=2, default=[256, 320], metavar=("H", "W"))
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--n", type=int, default=200, help="timed round trips (after 10 warm-up ones)")
    p.add_argument("--in-process", action="store_true", help="run the server on a thread of this process")
    a = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, server = None, None
    if a.in_process:
        server = PolicyServer(FixedChunkPolicy(a.horizon), "127.0.0.1", port).start()
    else:
        proc = mp.get_context("spawn").Process(target=_serve, args=(port, a.horizon), daemon=True)
        proc.start()
    try:
        image = np.random.default_rng(0).integers(0, 256, (*a.image, 3), dtype=np.uint8)  # (H, W, 3)
        obs = {"image": image, "instruction": "pick coke can", "seed": None}
        request = {"type": "infer", "observation": obs}
        codec = []
        for _ in range(50):
            t0 = time.perf_counter()
            unpackb(packb(request))
            codec.append((time.perf_counter() - t0) * 1e3)
        with PolicyClient("127.0.0.1", port, retry_until_up_s=30) as client:
            for _ in range(10):
                client.infer(obs)
            rt, srv, reply = [], [], None
            for _ in range(a.n):
                reply = client.infer(obs)
                rt.append(reply["timing"]["roundtrip_ms"])
                srv.append(reply["timing"]["server_ms"])
        print(json.dumps({
            "image": list(image.shape), "horizon": a.horizon, "n": a.n,
            "server": "thread" if a.in_process else "subprocess",
            "request_bytes": len(packb(request)), "reply_bytes": len(packb(reply)),
            "roundtrip_ms": _stats(rt), "server_ms": _stats(srv), "request_encode_decode_ms": _stats(codec),
            "requests_per_s": round(1e3 / float(np.mean(rt)), 1),
        }))
    finally:
        if server is not None:
            server.stop()
        if proc is not None:
            proc.terminate()
            proc.join(5)


if __name__ == "__main__":
    main()
