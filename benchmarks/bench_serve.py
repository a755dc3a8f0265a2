"""Policy server load: round-trip latency of the transport alone, and throughput under concurrent clients.

    python benchmarks/bench_serve.py                          # 256x320 image, server in a subprocess
    python benchmarks/bench_serve.py --image 512 640 --n 300  # SIMPLER's native frame
    python benchmarks/bench_serve.py --in-process             # server on a thread (shares the GIL)
    python benchmarks/bench_serve.py --policy tiny --clients 1 4 16 --seconds 10   # batching under load
    python benchmarks/bench_serve.py --policy tiny --largest  # server peak memory for the largest accepted request

Without --clients: one JSON object, round trip / server / encode+decode times in ms (mean, p50, p90, p99)
and bytes, one client. With --clients N...: one JSON line per N: requests/s over --seconds, round-trip p50 /
p99, the mean batch the server ran, and the server's peak resident memory (VmHWM). `--policy fixed` returns
a constant chunk (transport only); `--policy tiny` serves a random-weight SelfFlowPolicy (bench_policy's
layout, `--size`), so batching shows. With --largest: the server's peak memory before and after one
request of the largest accepted size (frames of --max-pixels each, as many as fit the message limit).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.client import PolicyClient  # noqa: E402
from policies.protocol import MAX_MESSAGE_BYTES, packb, unpackb  # noqa: E402
from policies.serve import PolicyServer  # noqa: E402
from policies.validation import DEFAULT_LIMITS  # noqa: E402


class FixedChunkPolicy:
    """Returns the same (H, 7) chunk every call: the transport is all that is measured."""

    def __init__(self, horizon: int = 16):
        self.chunk = np.linspace(-1, 1, horizon * 7, dtype=np.float32).reshape(horizon, 7)  # (H, 7)
        self.metadata = {"model_kind": "fixed-chunk", "horizon": horizon, "action_dim": 7}

    def predict_action_chunk(self, observation):
        return self.chunk, np.zeros(len(self.chunk), np.float32)


def _serve(port: int, horizon: int, policy: str = "fixed", size: str = "tiny", max_batch: int = 16,
           max_wait_ms: float = 2.0, threads: int = 1) -> None:
    if policy == "fixed":
        served = FixedChunkPolicy(horizon)
    else:  # a random-weight SelfFlowPolicy in bench_policy's layout (latency does not depend on the weights)
        import torch

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_policy import build_policy

        torch.set_num_threads(threads)
        layout = argparse.Namespace(height=32, width=40, horizon=horizon, patch=4, text_dim=256, text_len=32)
        served = build_policy(layout, size, torch.device("cpu"))
        served.sampling_steps = 10
    PolicyServer(served, "127.0.0.1", port, max_batch=max_batch, max_wait_ms=max_wait_ms).serve_forever()


def _peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _load(port: int, obs: dict, clients: int, seconds: float) -> dict:
    """`clients` threads, each with its own connection, sending requests back to back for `seconds`."""
    conns = [PolicyClient("127.0.0.1", port, retry_until_up_s=60) for _ in range(clients)]
    for c in conns:
        c.infer(obs)  # warm up every connection
    roundtrips, batches, start = [[] for _ in conns], [[] for _ in conns], threading.Barrier(clients + 1)
    deadline = [0.0]

    def run(i):
        start.wait()
        while time.perf_counter() < deadline[0]:
            reply = conns[i].infer({**obs, "seed": i})
            roundtrips[i].append(reply["timing"]["roundtrip_ms"])
            batches[i].append(reply["timing"].get("batch_size", 1))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    rt = [x for r in roundtrips for x in r]
    return {"clients": clients, "requests": len(rt), "requests_per_s": round(len(rt) / elapsed, 1),
            "roundtrip_ms": _stats(rt), "mean_batch": round(float(np.mean([b for bs in batches for b in bs])), 2)}


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
    p.add_argument("--policy", choices=("fixed", "tiny"), default="fixed",
                   help="fixed: a constant chunk (transport only); tiny: a random-weight SelfFlowPolicy")
    p.add_argument("--size", default="tiny", help="model size for --policy tiny")
    p.add_argument("--clients", type=int, nargs="+", default=None, help="concurrent clients per load level")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each load level")
    p.add_argument("--max-batch", type=int, default=16, help="the server's max batch")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's max wait for a batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (--policy tiny)")
    p.add_argument("--largest", action="store_true", help="peak server memory for the largest accepted request")
    a = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, server = None, None
    serve_args = (port, a.horizon, a.policy, a.size, a.max_batch, a.max_wait_ms, a.threads)
    if a.in_process:
        server = PolicyServer(FixedChunkPolicy(a.horizon), "127.0.0.1", port).start()
    else:
        proc = mp.get_context("spawn").Process(target=_serve, args=serve_args, daemon=True)
        proc.start()
    try:
        image = np.random.default_rng(0).integers(0, 256, (*a.image, 3), dtype=np.uint8)  # (H, W, 3)
        obs = {"image": image, "instruction": "pick coke can", "seed": None}
        if a.largest:
            _largest(port, proc)
        elif a.clients:
            for clients in a.clients:
                line = {"policy": a.policy, "image": list(image.shape), **_load(port, obs, clients, a.seconds),
                        "max_batch": a.max_batch, "max_wait_ms": a.max_wait_ms}
                if proc is not None:
                    line["server_peak_rss_mb"] = _peak_rss_mb(proc.pid)
                print(json.dumps(line), flush=True)
        else:
            _latency(port, obs, a)
    finally:
        if server is not None:
            server.stop()
        if proc is not None:
            proc.terminate()
            proc.join(5)


def _largest(port: int, proc) -> None:
    """Send the largest request the server accepts; print its peak memory before and after."""
    side = int(DEFAULT_LIMITS.max_pixels ** 0.5)  # a square frame of max_pixels
    frames = max(1, min(DEFAULT_LIMITS.max_frames, (MAX_MESSAGE_BYTES - 2**16) // (side * side * 3)))
    image = np.random.default_rng(0).integers(0, 256, (frames, side, side, 3), dtype=np.uint8)
    with PolicyClient("127.0.0.1", port, retry_until_up_s=60) as client:
        client.infer({"image": image[0, :64, :80], "instruction": "pick coke can"})  # warm up
        before = _peak_rss_mb(proc.pid)
        t0 = time.perf_counter()
        reply = client.infer({"image": image, "instruction": "pick coke can"})
        elapsed = time.perf_counter() - t0
    print(json.dumps({"largest_request": list(image.shape), "request_mb": round(image.nbytes / 2**20, 1),
                      "server_peak_rss_mb_before": before, "server_peak_rss_mb_after": _peak_rss_mb(proc.pid),
                      "roundtrip_s": round(elapsed, 2), "actions": list(reply["actions"].shape)}))


def _latency(port: int, obs: dict, a) -> None:
    """One client, back-to-back round trips: transport latency."""
    request = {"type": "infer", "observation": obs}
    codec = []
    for _ in range(50):
        t0 = time.perf_counter()
        unpackb(packb(request))
        codec.append((time.perf_counter() - t0) * 1e3)
    with PolicyClient("127.0.0.1", port, retry_until_up_s=60) as client:
        for _ in range(10):
            client.infer(obs)
        rt, srv, reply = [], [], None
        for _ in range(a.n):
            reply = client.infer(obs)
            rt.append(reply["timing"]["roundtrip_ms"])
            srv.append(reply["timing"]["server_ms"])
    print(json.dumps({
        "image": list(obs["image"].shape), "horizon": a.horizon, "n": a.n, "policy": a.policy,
        "server": "thread" if a.in_process else "subprocess",
        "request_bytes": len(packb(request)), "reply_bytes": len(packb(reply)),
        "roundtrip_ms": _stats(rt), "server_ms": _stats(srv), "request_encode_decode_ms": _stats(codec),
        "requests_per_s": round(1e3 / float(np.mean(rt)), 1),
    }))


if __name__ == "__main__":
    main()
