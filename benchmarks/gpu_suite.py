"""The GPU measurements in one call (<= 8 minutes on one H100/H200), each printed beside its reference.

1. Training step of `base` (bf16 autocast, AdamW, EMA update; benchmarks/bench_backbone.run_one) for plain flow
   matching and Self-Flow at 64 x 320 and 16 x 1152 tokens, eager and with the blocks compiled: tokens/s, MFU,
   peak memory, and the Self-Flow / flow-matching step-time ratio.
2. The policy's 10-step action chunk (worldmodel.fast_sampling.ChunkSampler, `base`, random weights) at batch 1
   and 8: eager bf16, compiled, and compiled with the whole loop in one CUDA graph.
3. The RT-1 reader's windows/s (on a generated RT-1-schema sample) beside the windows/s the fine-tuning step
   consumes at its measured speed.

References and targets: docs/GPU_REFERENCE.md. Results are also written as JSON (--out).

    python benchmarks/gpu_suite.py                      # CUDA: the full suite; elsewhere: a tiny smoke version
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite.json

A time budget (--budget-s, default 450 s) guards the 8-minute limit: a measurement is skipped (and reported as
skipped, never silently dropped) when the time left is less than the longest one of its kind took so far
(FULL["guess_s"] before one ran). A measurement that raises (out of memory, a compile or capture error) is
recorded with its error and the suite goes on; the JSON file is rewritten after every measurement, so a run killed
from outside keeps what it measured. The exit status is 1 when any measurement failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_backbone import run_one  # noqa: E402

from worldmodel.media_io import write_atomic  # noqa: E402

# docs/GPU_REFERENCE.md: H100, plain PyTorch (reference) and this targets
REFERENCE = {"mfu_compiled_64x320": 0.389, "selfflow_over_fm": 1.25, "chunk_ms_graph_b1": 18.1}
TARGET = {"mfu": 0.45, "selfflow_over_fm": 1.25, "chunk_ms_b1": 15.0}
FULL = {"size": "base", "shapes": [(64, 320), (16, 1152)], "compile": [False, True], "steps": 10, "warmup": 3,
        "policy_batches": [1, 8], "policy_modes": ["eager", "compiled", "graph"], "chunk_repeats": 20,
        "reader_windows": 2000, "reader_episodes": 64,
        # first-of-its-kind duration guesses (s, H100 class, compile included) for the budget; later ones of a kind
        # use the longest measured
        "guess_s": {"train True": 120, "train False": 30, "policy graph": 60, "policy compiled": 60,
                    "policy eager": 15, "reader": 40}}
SMOKE = {"size": "tiny", "shapes": [(2, 16), (1, 24)], "compile": [False], "steps": 1, "warmup": 1,
         "policy_batches": [1, 2], "policy_modes": ["eager"], "chunk_repeats": 2, "reader_windows": 20,
         "reader_episodes": 4}
POLICY_STEPS = 10  # Euler steps per chunk (the policy's default)
TRACEBACK_CHARS = 2500  # most of a failed measurement's traceback printed


class Budget:
    """Skips measurements that would not finish within ``seconds`` from now (the 8-minute guard): one of a kind
    starts only while the time left exceeds the longest one of that kind so far (``took``), or its guess before that."""

    def __init__(self, seconds: float, guess_s: dict[str, float] | None = None):
        self.end = time.perf_counter() + seconds
        self.longest: dict[str, float] = {}  # kind -> seconds of its longest measurement so far
        self.guess_s = dict(guess_s or {})  # kind -> expected seconds before one of the kind was measured

    def left(self) -> float:
        return self.end - time.perf_counter()

    def took(self, kind: str, seconds: float) -> None:
        self.longest[kind] = max(self.longest.get(kind, 0.0), seconds)

    def spent(self, name: str, rows: list[dict], show, kind: str = "") -> bool:
        """True (and ``name`` recorded and printed as skipped) when the time left cannot fit one more ``kind``."""
        left = self.left()
        if left > 0 and left > self.longest.get(kind, self.guess_s.get(kind, 0.0)):
            return False
        rows.append({"name": name, "skipped": "time budget spent"})
        show(name, "skipped (time budget spent)")
        return True


def measure(name: str, kind: str, budget: Budget, show, cuda: bool, fn, *args) -> dict:
    """``{"name": name, **fn(*args)}``, or ``{"name": name, "error": ...}`` (printed, with the traceback's last frames
    on stderr) when ``fn`` raises: one failed measurement never loses the others. Its duration feeds ``budget``."""
    start = time.perf_counter()
    try:
        row = {"name": name, **fn(*args)}
        if cuda:
            torch.cuda.synchronize()  # an asynchronous CUDA error surfaces here, in this measurement
    except Exception as err:  # noqa: BLE001 - recorded in the JSON and printed, never silent
        first = (str(err).splitlines() or [""])[0][:300]
        row = {"name": name, "error": f"{type(err).__name__}: {first}"}
        show(name, f"ERROR {row['error']}")
        text = "".join(traceback.format_exception(err, limit=-6))  # compile errors can run to hundreds of lines:
        print(text[:TRACEBACK_CHARS] + ("... [truncated]" if len(text) > TRACEBACK_CHARS else ""), file=sys.stderr,
              flush=True)  # bounded, so the figures stay in a captured output's tail
    budget.took(kind, time.perf_counter() - start)
    return row


def _fresh(cuda: bool) -> None:
    """Free the previous measurement's memory and compiled graphs (each measurement stands alone)."""
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def training(plan: dict, device: str, budget: Budget, show, configs: list[tuple[bool, tuple[int, int]]],
             rows: list[dict] | None = None, save=lambda: None) -> list[dict]:
    """Training steps for each (compiled, (batch, tokens)) in ``configs``, both objectives, appended to ``rows``
    (returned); ``save()`` after each."""
    cuda = device.startswith("cuda")
    rows = [] if rows is None else rows
    for compiled, (batch, tokens) in configs:
        for objective in ("plain", "selfflow"):
            name = f"train {plan['size']} {objective} {batch}x{tokens} {'compiled' if compiled else 'eager'}"
            if budget.spent(name, rows, show, kind=f"train {compiled}"):
                continue
            _fresh(cuda)
            opts = {"size": plan["size"], "objective": objective, "device": device, "batch": batch,
                    "tokens": tokens, "text_tokens": 0, "steps": plan["steps"], "warmup": plan["warmup"],
                    "dtype": "bf16" if cuda else "fp32", "compile": compiled, "sdpa_backend": None,
                    "threads": None}
            row = measure(name, f"train {compiled}", budget, show, cuda, run_one, opts)
            rows.append(row)
            save()
            if "error" in row:
                continue
            mfu = ("n/a (not an H100/H200 in bf16)" if row["mfu"] is None
                   else f"{100 * row['mfu']:.1f}% of {row['peak_tflops']:.0f} TFLOP/s")
            ref = ""
            if compiled and (batch, tokens) == (64, 320):
                ref = (f" | reference {100 * REFERENCE['mfu_compiled_64x320']:.1f}% (H100 plain PyTorch), "
                       f"target >= {100 * TARGET['mfu']:.0f}%")
            show(name, f"{row['tokens_per_s']:.0f} tokens/s, {row['ms_per_step']:.1f} ms/step, MFU {mfu}, "
                       f"peak {row['peak_mem_mb']:.0f} MiB{ref}")
    return rows


def ratios(rows: list[dict], configs: list[tuple[bool, tuple[int, int]]], show) -> list[dict]:
    """Self-Flow / flow-matching step-time ratio per measured (compiled, shape)."""
    out = []
    for compiled, (batch, tokens) in configs:
        tag = f"{batch}x{tokens} {'compiled' if compiled else 'eager'}"
        pair = {r["objective"]: r for r in rows if r["name"].endswith(tag) and "ms_per_step" in r}
        if {"plain", "selfflow"} <= set(pair):
            ratio = pair["selfflow"]["ms_per_step"] / pair["plain"]["ms_per_step"]
            out.append({"name": f"selfflow/fm {tag}", "ratio": round(ratio, 3)})
            show(f"Self-Flow / FM step {tag}",
                 f"{ratio:.2f}x | reference {REFERENCE['selfflow_over_fm']:.2f}x (H100 plain PyTorch), "
                 f"target <= {TARGET['selfflow_over_fm']:.2f}x")
    return out


def _policy_sequence(model, batch: int, device):
    """The policy layout of bench_policy: 2 clean 32x40 context frames (patch 4: 80 tokens each), 16 actions,
    32 text tokens; random values (latency does not depend on them)."""
    from worldmodel.action_modes import WindowLayout, build_sequence
    from worldmodel.codecs import build_frame_codec

    codec = build_frame_codec("patch", patch=4)
    geometry = WindowLayout(2, 0, 1, 16)
    context = torch.rand(batch, 2, 3, 32, 40, device=device) * 2 - 1
    h = geometry.horizon
    return build_sequence("policy", codec, context, None, torch.zeros(batch, h, 7, device=device),
                          torch.zeros(batch, h, device=device), torch.ones(batch, h, dtype=torch.bool, device=device),
                          geometry, text=torch.randn(batch, 32, model.cfg.text_dim, device=device),
                          text_mask=torch.ones(batch, 32, dtype=torch.bool, device=device))


def chunk_latency(plan: dict, device: str, mode: str, batch: int) -> dict:
    """Median / min wall time of one sampled chunk in ``mode`` (eager bf16 | compiled | graph) at ``batch``."""
    from worldmodel.fast_sampling import ChunkSampler
    from worldmodel.sizes import build_model

    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    model = build_model(plan["size"]).to(device).eval()
    if cuda and mode == "eager":
        model.to(torch.bfloat16)
    sampler = ChunkSampler(model, POLICY_STEPS, {"action": 7.4}, compile=mode != "eager", graph=mode == "graph")
    seq = _policy_sequence(model, batch, device)
    generator = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    sampler(seq, generator)  # compile / capture
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    if mode == "graph" and sampler.graph_error:  # it fell back to no graph: its times are not this mode's
        raise RuntimeError(f"CUDA graph capture failed: {sampler.graph_error}")
    times = []
    for _ in range(plan["chunk_repeats"]):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler(seq, generator)
        if cuda:
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    return {"ms_median": round(times[len(times) // 2], 2), "ms_min": round(times[0], 2),
            "first_call_s": round(first_s, 1), "tokens": seq.x.shape[1], "batch": batch, "mode": mode}


def policy(plan: dict, device: str, budget: Budget, show, modes: list[str], rows: list[dict] | None = None,
           save=lambda: None) -> list[dict]:
    """The policy's chunk latency for each mode and batch, appended to ``rows`` (returned); ``save()`` after each."""
    cuda = device.startswith("cuda")
    rows = [] if rows is None else rows
    for mode in modes:
        for batch in plan["policy_batches"]:
            name = f"policy {plan['size']} {POLICY_STEPS}-step chunk batch {batch} {mode}"
            if budget.spent(name, rows, show, kind=f"policy {mode}"):
                continue
            _fresh(cuda)
            row = measure(name, f"policy {mode}", budget, show, cuda, chunk_latency, plan, device, mode, batch)
            rows.append(row)
            save()
            if "error" in row:
                continue
            ref = ""
            if batch == 1 and mode == "graph":
                ref = (f" | reference {REFERENCE['chunk_ms_graph_b1']} ms (H100, one CUDA graph), "
                       f"target <= {TARGET['chunk_ms_b1']:.0f} ms")
            show(name, f"{row['ms_median']:.1f} ms median (min {row['ms_min']:.1f}; first call "
                       f"{row['first_call_s']:.1f} s){ref}")
    return rows


def reader_rate(plan: dict, train_rows: list[dict]) -> dict:
    """The RT-1 reader's windows/s on a generated sample, beside what the fastest Self-Flow step consumes."""
    from bench_rt1_loader import measure as windows_per_s

    from worldmodel.data.rt1_synthetic import ensure_embedded_sample

    threads = max(1, min(16, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as cache:
        data = ensure_embedded_sample(cache, num_episodes=plan["reader_episodes"], steps=24, quiet=True)
        rate, n = windows_per_s(str(data), threads, plan["reader_windows"], 32, 40, 256)
    steps = [r for r in train_rows if "ms_per_step" in r and r["objective"] == "selfflow"]
    fastest = min(steps, key=lambda r: r["ms_per_step"], default=None)
    need = None if fastest is None else fastest["batch"] / (fastest["ms_per_step"] / 1000)
    return {"windows_per_s": round(rate, 1), "windows": n, "threads": threads,
            "training_consumes_windows_per_s": None if need is None else round(need, 1),
            "fastest_selfflow_step": None if fastest is None else fastest["name"]}


def reader(plan: dict, train_rows: list[dict], budget: Budget, show) -> list[dict]:
    name, rows = "rt1 reader windows/s", []
    if budget.spent(name, rows, show, kind="reader"):
        return rows
    row = measure(name, "reader", budget, show, False, reader_rate, plan, train_rows)
    if "error" not in row:
        need = row["training_consumes_windows_per_s"]
        show(name, f"{row['windows_per_s']:.0f} windows/s over {row['windows']} windows ({row['threads']} threads, "
                   "32x40 frames)" + ("" if need is None else f" | the fastest Self-Flow step "
                                      f"({row['fastest_selfflow_step']}) consumes {need:.0f} windows/s (one window "
                                      "per sample)"))
    return [row]


def _write_json(out: Path, record: dict) -> None:
    text = json.dumps(record, indent=2)
    write_atomic(out, lambda tmp: tmp.write_text(text))


def run_suite(smoke: bool, out: Path, budget_s: float) -> dict:
    """Run every measurement, print each beside its reference, write the JSON record to ``out`` (after every
    measurement, "complete": false until the end); ``record["errors"]`` counts the measurements that raised."""
    cuda = torch.cuda.is_available() and not smoke
    device = "cuda" if cuda else "cpu"
    plan = FULL if cuda else SMOKE
    budget = Budget(budget_s, plan.get("guess_s"))
    started = time.perf_counter()

    def show(name: str, text: str) -> None:
        print(f"{name:<52} {text}", flush=True)

    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"GPU suite on {name} ({'full' if cuda else 'smoke: no CUDA, tiny sizes, no compile'})", flush=True)
    record = {"device": name, "mode": "full" if cuda else "smoke", "torch": torch.__version__,
              "reference": REFERENCE, "target": TARGET, "training": [], "policy": [], "reader": [],
              "errors": 0, "complete": False, "wall_s": 0.0}

    def save() -> None:
        rows = record["training"] + record["policy"] + record["reader"]
        record.update(errors=sum("error" in r for r in rows), wall_s=round(time.perf_counter() - started, 1))
        _write_json(out, record)

    # the figures with a reference first (compiled 64 x 320 training, graph-captured chunk), so a spent budget
    # skips the least important ones; each section's rows go into ``record`` as they are measured
    configs = [(c, shape) for c in sorted(plan["compile"], reverse=True) for shape in plan["shapes"]]
    modes = sorted(plan["policy_modes"], key=lambda m: m != "graph")
    training(plan, device, budget, show, configs[:1], record["training"], save)
    policy(plan, device, budget, show, modes[:1], record["policy"], save)
    training(plan, device, budget, show, configs[1:], record["training"], save)
    policy(plan, device, budget, show, modes[1:], record["policy"], save)
    record["training"] += ratios(record["training"], configs, show)
    record["reader"] = reader(plan, record["training"], budget, show)
    record["complete"] = True
    save()
    print(f"wrote {out} ({record['wall_s']} s, {record['errors']} failed measurements)", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the tiny CPU version even when CUDA is available")
    ap.add_argument("--out", default="outputs/gpu_suite.json", help="JSON results file")
    ap.add_argument("--budget-s", type=float, default=450.0, help="start no measurement after this many seconds")
    args = ap.parse_args(argv)
    record = run_suite(args.smoke, Path(args.out), args.budget_s)
    sys.exit(1 if record["errors"] else 0)


if __name__ == "__main__":
    main()
