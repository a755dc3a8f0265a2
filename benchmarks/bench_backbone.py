"""Training-step throughput, memory and MFU of the backbone, with and without the Self-Flow teacher pass.

Prints one JSON line per (size, objective) configuration. Each configuration runs in its own
subprocess so peak memory (CPU: max RSS; CUDA: max_memory_allocated) belongs to it alone.

A step is what the trainer does: SelfFlowObjective.loss (dual timestep, student forward, and for
Self-Flow the EMA teacher forward up to block k without gradients), backward, AdamW, EMA update.
FLOPs are counted once per configuration with torch.utils.flop_counter (matmuls and attention,
forward + backward, teacher included; attention added analytically where the SDPA kernel is not in
torch's FLOP registry, as on CPU); the analytic 6 * params * tokens + attention estimate of
the plain step is printed beside it. MFU = counted FLOPs / step time / peak (dense bf16: H100/H200 SXM
989 TFLOP/s, the PCIe / NVL boards less: PEAK_BF16_FLOPS; reported only for bf16 on those GPUs).

    python benchmarks/bench_backbone.py                       # CPU: tiny and small
    python benchmarks/bench_backbone.py --sizes base --batch 64 --tokens 320 --compile --sdpa-backend cudnn

--compile compiles each block in place (worldmodel.train_step.compile_blocks), as the Trainer does.
benchmarks/gpu_suite.py runs the whole GPU measurement (training, policy chunk, reader) in one call.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worldmodel.ema import EMA  # noqa: E402
from worldmodel.selfflow import SelfFlowConfig, SelfFlowObjective  # noqa: E402
from worldmodel.sizes import build_model  # noqa: E402
from worldmodel.tokens import TokenSequence  # noqa: E402
from worldmodel.train_step import compile_blocks  # noqa: E402

# dense bf16 tensor-core peak by device-name substring, most specific first (the PCIe / NVL boards run slower
# than the SXM ones: NVIDIA's datasheets, dense = half the "with sparsity" figure)
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU named ``device_name`` (torch.cuda.get_device_name), None if not listed."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)
DEFAULT_BATCH = {"cpu": {"tiny": 8, "small": 2, "base": 1}, "cuda": {"tiny": 64, "small": 64, "base": 64}}
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def make_batch(batch: int, tokens: int, text_tokens: int, text_dim: int, device) -> TokenSequence:
    """Random image tokens (48 channels) on a square-ish (h, w) grid, all noised; optional random text."""
    side = max(int(tokens**0.5), 1)
    idx = torch.arange(tokens)
    pos = torch.stack([torch.zeros(tokens), (idx // side).float(), (idx % side).float()], dim=1)  # (N, 3)
    x = torch.randn(batch, tokens, 48)  # (B, N, 48)
    text = torch.randn(batch, text_tokens, text_dim) if text_tokens else None
    return TokenSequence(x=x, tau=torch.zeros(batch, tokens), pos=pos, layout=(("image", tokens),),
                         loss_mask=torch.ones(batch, tokens, dtype=torch.bool), text=text).to(device)


def analytic_flops(model, batch: int, tokens: int, text_len: int) -> float:
    """Plain fwd+bwd step: 6 * (block matmul params) * tokens they touch + attention 12 * depth * B * S^2 * D.

    Modulation linears are left out (computed once per time level, not per token); double blocks apply
    their media weights to the N media tokens and their text weights to the L text tokens.
    """
    seq_len = tokens + text_len
    flops = 0.0
    for name, p in model.named_parameters():
        if p.dim() != 2 or ".mod." in name:
            continue
        if name.startswith("double_blocks"):
            flops += 6.0 * p.numel() * batch * (text_len if ".txt." in name else tokens)
        elif name.startswith("single_blocks"):
            flops += 6.0 * p.numel() * batch * seq_len
    return flops + attention_flops(model.num_blocks, batch, seq_len, model.hidden_size, 3)


def attention_flops(blocks: int, batch: int, seq_len: int, hidden: int, passes: int) -> float:
    """QK^T and AV: 4 * B * S^2 * D per block forward; passes = 3 for fwd+bwd, 1 for forward only."""
    return 4.0 * passes * blocks * batch * seq_len**2 * hidden


def run_one(opts: dict) -> dict:
    """Benchmark one configuration in this process; returns the JSON record."""
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    device = torch.device(opts["device"])
    cuda = device.type == "cuda"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    torch.manual_seed(0)
    model = build_model(opts["size"]).to(device)
    cfg = SelfFlowConfig() if opts["objective"] == "selfflow" else SelfFlowConfig.plain_flow_matching()
    obj = SelfFlowObjective.for_model(model, cfg).to(device)
    ema = EMA(model) if cfg.uses_teacher else None
    eager_model = copy.deepcopy(model) if opts["compile"] else model  # FLOPs are counted eagerly
    student = compile_blocks(model) if opts["compile"] else model  # as the Trainer compiles: each block in place
    teacher = None if ema is None else (compile_blocks(ema.model) if opts["compile"] else ema.model)
    opt = torch.optim.AdamW([*model.parameters(), *obj.parameters()], lr=1e-4, fused=cuda)
    seq = make_batch(opts["batch"], opts["tokens"], opts["text_tokens"], model.cfg.text_dim, device)
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[opts["dtype"]]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = obj.loss(student, teacher, seq, gen, factorize=True)  # no host sync, as the tasks
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model)

    backend_ctx = _sdpa_context(opts["sdpa_backend"])
    with backend_ctx:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:  # eager count of one step (forward, teacher, backward)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                eager_teacher = None if ema is None else copy.deepcopy(eager_model).requires_grad_(False)
                loss, _ = obj.loss(eager_model, eager_teacher, seq, gen, factorize=True)
            loss.backward()
        opt.zero_grad(set_to_none=True)
        del eager_model, eager_teacher
        flops = float(counter.get_total_flops())
        counted = counter.get_flop_counts().get("Global", {})
        if not any("attention" in str(op) for op in counted):  # CPU SDPA kernels are not in torch's registry
            seq_len = opts["tokens"] + (opts["text_tokens"] or 1)
            flops += attention_flops(model.num_blocks, opts["batch"], seq_len, model.hidden_size, 3)
            if cfg.uses_teacher:
                flops += attention_flops(obj.teacher_block + 1, opts["batch"], seq_len, model.hidden_size, 1)
        for _ in range(opts["warmup"]):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(opts["steps"]):
            step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start

    ms = 1000.0 * elapsed / opts["steps"]
    text_len = opts["text_tokens"] or 1  # null text token when there is no text
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        name = torch.cuda.get_device_name(device)
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        name = "cpu"
    peak = peak_bf16_flops(name) if opts["dtype"] == "bf16" else None
    return {
        "size": opts["size"], "objective": opts["objective"], "device": name, "dtype": opts["dtype"],
        "compile": opts["compile"], "sdpa_backend": opts["sdpa_backend"], "batch": opts["batch"],
        "tokens": opts["tokens"], "text_tokens": text_len,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "blocks_student_teacher": [obj.student_block, obj.teacher_block] if cfg.uses_teacher else None,
        "ms_per_step": round(ms, 2),
        "tokens_per_s": round(opts["batch"] * opts["tokens"] / (ms / 1000.0), 1),
        "tflop_per_step": round(flops / 1e12, 4),
        "tflop_per_step_analytic_plain": round(analytic_flops(model, opts["batch"], opts["tokens"], text_len) / 1e12,
                                               4),
        "achieved_tflops": round(flops / (ms / 1000.0) / 1e12, 2),
        "mfu": None if peak is None else round(flops / (ms / 1000.0) / peak, 4),
        "peak_tflops": None if peak is None else peak / 1e12,
        "peak_mem_mb": round(peak_mb, 1),
        "peak_mem_kind": "cuda max_memory_allocated" if cuda else "max RSS growth over the process baseline",
    }


def _sdpa_context(name: str | None):
    import contextlib

    if not name:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel(backend)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--sizes", default=None, help="comma list; default tiny,small on CPU, tiny,small,base on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="batch per step (default per size and device)")
    ap.add_argument("--tokens", type=int, default=None, help="media tokens per sample (default 256 CPU, 320 CUDA)")
    ap.add_argument("--text-tokens", type=int, default=0, help="random text tokens per sample (0 = null text)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 3 CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 5 CUDA)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="autocast dtype (default bf16 on CUDA)")
    ap.add_argument("--objectives", default="plain,selfflow", help="comma list of plain, selfflow")
    ap.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    ap.add_argument("--sdpa-backend", choices=SDPA_BACKENDS, default=None, help="force one SDPA backend")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config (JSON)
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    if kind == "cuda" and not cuda:
        raise ValueError("--device cuda was asked for but CUDA is not available; use --device cpu")
    sizes = (args.sizes or ("tiny,small,base" if kind == "cuda" else "tiny,small")).split(",")
    objectives = args.objectives.split(",")
    bad = [o for o in objectives if o not in ("plain", "selfflow")]
    if bad:
        raise ValueError(f"unknown objective(s) {bad}; use --objectives plain,selfflow")
    for size in sizes:
        for objective in objectives:
            opts = {
                "size": size, "objective": objective, "device": args.device,
                "batch": args.batch or DEFAULT_BATCH[kind].get(size, 1),
                "tokens": args.tokens or (320 if kind == "cuda" else 256), "text_tokens": args.text_tokens,
                "steps": args.steps or (20 if kind == "cuda" else 3),
                "warmup": args.warmup if args.warmup is not None else (5 if kind == "cuda" else 1),
                "dtype": args.dtype or ("bf16" if kind == "cuda" else "fp32"), "compile": args.compile,
                "sdpa_backend": args.sdpa_backend, "threads": args.threads,
            }
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(opts)], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                print(json.dumps({**opts, "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
            else:
                print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
