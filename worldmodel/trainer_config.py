"""The Trainer's configuration (mirrors the Hydra group configs/trainer) and its learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass
class TrainerConfig:
    """Optimisation and bookkeeping (mirrors the Hydra group configs/trainer)."""

    output_dir: str = "outputs/run"  # run folder: checkpoint/, metrics.jsonl, loss_curves.png
    max_steps: int = 1000  # optimizer steps in total
    lr: float = 1e-4  # peak learning rate (after warmup)
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at max_steps
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # AdamW decoupled weight decay, on matrices only (ndim >= 2)
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps to lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    accum_steps: int = 1  # micro-batches per optimizer step (per rank)
    precision: str = "bf16"  # "bf16": autocast to bfloat16 on CUDA (fp32 master weights); "fp32". CPU is fp32.
    # torch.compile each block of the EMA-tracked module (and of its EMA copy): "auto" = on CUDA only, true, false
    compile: bool | str = "auto"
    ema: bool = True  # keep EMA weights of the ema_targets modules (teacher + inference weights)
    ema_decay: float = 0.9999  # EMA decay
    ema_warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n)) so short runs get a usable EMA
    checkpoint_every: int = 1000  # save every N steps (and always at the end); 0 = only at the end
    log_every: int = 10  # metrics.jsonl every N steps; 0 = never
    eval_every: int = 0  # call the callbacks every N steps (and at the end); 0 = only at the end
    seed: int = 0  # global RNGs are seeded per rank from (seed, rank)
    fsdp: bool = False  # shard the ema_target module with FSDP2 (torchrun, world size > 1)
    resume: str | None = "auto"  # "auto": resume from <output_dir>/checkpoint if present; a path; None = fresh
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = False  # mirror metrics to TensorBoard (needs tensorboard)
    wandb_project: str | None = None  # mirror metrics to Weights & Biases (needs wandb)
    device: str = "auto"  # "auto" | "cpu" | "cuda"

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile must be true, false or 'auto' (CUDA only), got {self.compile!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        for name in ("max_steps", "accum_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "log_every", "eval_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, cfg) -> TrainerConfig:
        """From a dict / OmegaConf node; unknown keys are an error naming them."""
        data = dict(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown trainer config key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**data)

    def compiles_on(self, device: torch.device) -> bool:
        """Whether the backbone is compiled on ``device`` ("auto": on CUDA, eager elsewhere)."""
        return device.type == "cuda" if self.compile == "auto" else bool(self.compile)


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


__all__ = ["TrainerConfig", "lr_at"]
