"""Latency of SelfFlowPolicy: one action chunk (predict_action_chunk) and one `step()`, batch 1.

The policy layout of the H100 reference (docs/GPU_REFERENCE.md): two clean context frames
(32x40 patch-4 frames: 80 tokens each),
H = 16 action tokens, 32 text tokens = 208 tokens, sampled with N Euler steps. Weights are RANDOM
(latency does not depend on them); every JSON line says so. A chunk is timed end to end as a robot
stack sees it: image resize + tokenization + N model forwards + unnormalization + copy to the host.
A step is `policy.step(image)` over whole episodes with execute_steps = H, so `step_ms_mean` is the
amortized cost per control step and `step_ms_query` the cost of a step that samples a new chunk.

Prints one JSON line per (size, mode, sampling steps). On CUDA the default is `base` in bf16
(autocast) eager, with torch.compile, and with torch.compile(mode="reduce-overhead") (CUDA graphs);
the goal is one 10-step chunk in <= 50 ms.

    python benchmarks/bench_policy.py                                    # CPU: tiny and small, fp32
    python benchmarks/bench_policy.py --device cuda --sizes base --modes eager compile reduce-overhead
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from policies.selfflow_policy import SelfFlowPolicy  # noqa: E402
from worldmodel.action_modes import ACTION_TOKEN_DIM  # noqa: E402
from worldmodel.actions import ActionNormalizer  # noqa: E402
from worldmodel.codecs import build_frame_codec  # noqa: E402
from worldmodel.sizes import build_model  # noqa: E402
from worldmodel.text import build_text_encoder  # noqa: E402

MODES = ("eager", "compile", "reduce-overhead")
INSTRUCTION = "pick coke can"


def run_config(args, size: str) -> dict:
    """The fine-tuning run config (run_cfg) a checkpoint would store, for the benchmark's layout."""
    return {
        "data": {"height": args.height, "width": args.width, "context_frames": 2, "future_frames": 2,
                 "frame_stride": 1, "horizon": args.horizon},
        "codec": {"frames": "patch", "patch": args.patch, "frames_path": None, "audio": "patch", "audio_frame": 64,
                  "audio_path": None},
        "text": {"encoder": "byte", "dim": args.text_dim, "layers": 1, "max_len": args.text_len, "path": None},
        "model": {"size": size, "overrides": {}},
    }


def build_policy(args, size: str, device: torch.device) -> SelfFlowPolicy:
    """A SelfFlowPolicy over a randomly initialised `size` backbone (fp32 weights; autocast picks bf16)."""
    torch.manual_seed(0)
    run = run_config(args, size)
    codec = build_frame_codec("patch", patch=args.patch)
    text = build_text_encoder("byte", dim=args.text_dim, max_len=args.text_len, layers=1)
    model = build_model(size, token_dim={"video": codec.token_dim, "action": ACTION_TOKEN_DIM},
                        text_dim=text.feature_dim)
    normalizer = ActionNormalizer(q01=[-0.05] * 3 + [-0.2] * 3, q99=[0.05] * 3 + [0.2] * 3)
    return SelfFlowPolicy(model.to(device).eval(), text.to(device).eval(), codec, normalizer, run, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_chunks(policy: SelfFlowPolicy, image: np.ndarray, repeats: int, warmup: int, amp, device) -> list[float]:
    """Milliseconds per predict_action_chunk call (the result is on the host, so the GPU work is included)."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        with amp():
            out = policy.predict_action_chunk({"image": image, "instruction": INSTRUCTION, "seed": i})
        dt = (time.perf_counter() - t0) * 1e3
        if not np.all(np.isfinite(out["actions"])):
            raise RuntimeError("the policy returned non-finite actions")
        if i >= warmup:
            times.append(dt)
    return times


def time_steps(policy: SelfFlowPolicy, image: np.ndarray, episodes: int, amp) -> tuple[list[float], list[float]]:
    """(ms of every step, ms of the steps that sampled a chunk) over `episodes` chunks' worth of steps."""
    horizon = policy.geometry.horizon
    policy.reset(INSTRUCTION)
    all_steps, query_steps = [], []
    for i in range(episodes * horizon):
        t0 = time.perf_counter()
        with amp():
            policy.step(image)
        dt = (time.perf_counter() - t0) * 1e3
        all_steps.append(dt)
        if i % horizon == 0:
            query_steps.append(dt)
    return all_steps, query_steps


def stats(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"mean": round(statistics.fmean(times), 3), "p50": round(statistics.median(times), 3),
            "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3), "min": round(ordered[0], 3)}


def bench_size(args, size: str, mode: str, device: torch.device) -> list[dict]:
    policy = build_policy(args, size, device)
    params = sum(p.numel() for p in policy.model.parameters())
    if mode != "eager":
        policy.model = torch.compile(policy.model, mode="reduce-overhead" if mode == "reduce-overhead" else None)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None

    def amp():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    image = np.random.default_rng(0).integers(0, 256, (*args.image_size, 3), dtype=np.uint8)  # (H, W, 3)
    ctx = policy.codec.num_tokens((1, 2, 3, args.height, args.width))
    records = []
    for steps in args.steps:
        policy.sampling_steps = steps
        t0 = time.perf_counter()
        chunk = time_chunks(policy, image, args.repeats, args.warmup, amp, device)
        warm_s = time.perf_counter() - t0 - sum(chunk) / 1e3
        policy.seed = 0
        all_steps, query_steps = time_steps(policy, image, args.episodes, amp)
        policy.seed = None
        chunk_stats = stats(chunk)
        record = {
            "bench": "policy", "size": size, "params_m": round(params / 1e6, 1), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": args.dtype, "mode": mode, "sampling_steps": steps, "batch": 1,
            "tokens": {"context": ctx, "action": args.horizon, "text": args.text_len,
                       "total": ctx + args.horizon + args.text_len},
            "image": list(args.image_size), "threads": torch.get_num_threads(),
            "chunk_ms": chunk_stats, "ms_per_euler_step": round(chunk_stats["p50"] / steps, 3),
            "step_ms_mean": round(statistics.fmean(all_steps), 3),
            "step_ms_query": round(statistics.median(query_steps), 3),
            "execute_steps": args.horizon, "repeats": args.repeats, "warmup": args.warmup,
            "warmup_s": round(warm_s, 2), "weights": "random (timing only)",
        }
        if device.type == "cuda":
            record["goal_10_step_chunk_ms"] = 50.0
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        print(json.dumps(record), flush=True)
        records.append(record)
    return records


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--sizes", nargs="+", default=None, help="model sizes (default: tiny small on CPU, base on CUDA)")
    p.add_argument("--modes", nargs="+", default=None, choices=MODES,
                   help="eager | compile | reduce-overhead (default: eager on CPU, all three on CUDA)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10], help="Euler steps per chunk")
    p.add_argument("--repeats", type=int, default=None, help="timed chunks per config (default 5 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed chunks first (default 1 CPU, 5 CUDA)")
    p.add_argument("--episodes", type=int, default=2, help="chunks' worth of step() calls for the per-step time")
    p.add_argument("--horizon", type=int, default=16, help="action tokens H per chunk")
    p.add_argument("--height", type=int, default=32, help="model frame height")
    p.add_argument("--width", type=int, default=40, help="model frame width")
    p.add_argument("--patch", type=int, default=4, help="patch codec size (32x40 / 4 -> 80 tokens per frame)")
    p.add_argument("--text-len", type=int, default=32, help="text tokens (byte encoder max_len)")
    p.add_argument("--text-dim", type=int, default=256, help="text feature width")
    p.add_argument("--image-size", type=int, nargs=2, default=[256, 320], help="camera image H W given to step()")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; use --device cpu")
    cuda = args.device.startswith("cuda")
    args.sizes = args.sizes or (["base"] if cuda else ["tiny", "small"])
    args.modes = args.modes or (list(MODES) if cuda else ["eager"])
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.repeats = args.repeats or (50 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if min(args.steps) < 1 or args.repeats < 1 or args.episodes < 1:
        raise SystemExit("--steps, --repeats and --episodes must be >= 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    records = []
    for size in args.sizes:
        for mode in args.modes:
            records += bench_size(args, size, mode, device)
    return records


if __name__ == "__main__":
    main()
