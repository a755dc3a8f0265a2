"""The one training loop for pretraining and fine-tuning, driven by a small task protocol.

A task owns its modules, data and loss; the Trainer owns optimisation: AdamW (fused on CUDA),
linear warmup + cosine decay, gradient accumulation and clipping, bf16 autocast on CUDA (fp32
master weights), optional ``torch.compile``, EMA weights (the Self-Flow teacher and the weights
written for inference), atomic checkpoints with exact resume, data parallelism under torchrun
(optionally FSDP2 for the EMA-tracked backbone), a progress bar, metrics JSONL + loss-curve PNG (each metric
averaged over the micro-steps that reported it),
and periodic callbacks for evaluation / sampling.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from worldmodel import distributed as wdist
from worldmodel.checkpoint import TrainState, load_checkpoint, load_state_strict, save_checkpoint
from worldmodel.loss_plot import plot_loss_curves
from worldmodel.metrics_log import MetricMeans, MetricsLogger

log = logging.getLogger(__name__)
HISTORY_KEEP = 10_000  # per-step records kept in Trainer.history
STEP_KEYS = ("loss", "lr", "grad_norm")  # per optimizer step (loss averaged over ranks), not per micro-step


class TrainingTask(Protocol):
    """What the Trainer needs from a stage (pretraining, RT-1 fine-tuning, a test MLP).

    Optional: ``ema_targets()`` names every module whose EMA copy is used for inference (default
    ``(ema_target(),)``; modules without trainable parameters are used as they are), and
    ``bind_inference(modules)`` receives the Trainer's inference weights ({name: module}) once.
    """

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules by name ("model", "objective", ...); all are optimised and checkpointed."""

    def ema_target(self) -> str | None:
        """Name of the EMA-tracked module whose copy is the teacher (the student backbone), or None for no EMA."""

    def batches(self, start_step: int, rank: int, world_size: int) -> Iterator[Any]:
        """This rank's micro-batches from optimizer step ``start_step`` on (accum_steps per step), deterministic."""

    def loss(self, batch: Any, step: int, ema: nn.Module | None) -> tuple[Tensor, dict[str, float]]:
        """(scalar loss, float metrics) of one micro-batch; ``ema`` is the EMA copy (teacher) or None."""


class BackboneTask:
    """Base of the pretraining and fine-tuning tasks: backbone + objective (projector) + text encoder.

    The backbone's EMA is the Self-Flow teacher; the EMA backbone and the EMA text encoder (when it trains)
    are the inference weights, always used as a pair (``text_encoder_for``).
    """

    model: nn.Module
    objective: nn.Module
    text_encoder: nn.Module
    _inference: dict[str, nn.Module] | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "objective": self.objective, "text_encoder": self.text_encoder}

    def ema_target(self) -> str:
        return "model"

    def ema_targets(self) -> tuple[str, ...]:
        return ("model", "text_encoder")

    def bind_inference(self, modules: dict[str, nn.Module]) -> None:
        self._inference = dict(modules)

    def text_encoder_for(self, model: nn.Module | None) -> nn.Module:
        """The text encoder paired with ``model``: the EMA text encoder for the EMA backbone, else the trained one."""
        inference = self._inference or {}
        if model is not None and model is not self.model and model is inference.get("model"):
            return inference.get("text_encoder", self.text_encoder)
        return self.text_encoder


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
    compile: bool = False  # torch.compile the EMA-tracked module (and its EMA copy) in place
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


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU + CUDA) from (seed, rank): different per rank, reproducible."""
    value = int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def rng_state_tensors() -> dict[str, Tensor]:
    """This process's RNG states (torch CPU/CUDA, numpy, python) as plain tensors (no pickle)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    out = {
        "torch_cpu": torch.get_rng_state(),  # uint8
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),  # (624,)
        "numpy_ints": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([gauss], dtype=torch.float64),
        "python_state": torch.tensor([version, *py_state], dtype=torch.int64),  # (626,)
        "python_gauss": torch.tensor([math.nan if py_gauss is None else py_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state_tensors(state: dict[str, Tensor]) -> None:
    """Inverse of rng_state_tensors."""
    torch.set_rng_state(state["torch_cpu"])
    ints = state["numpy_ints"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), ints[0], ints[1],
                         float(state["numpy_gauss"][0])))
    py = state["python_state"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((py[0], tuple(py[1:]), None if math.isnan(gauss) else gauss))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


class Trainer:
    """Runs ``task`` under ``config``; ``checkpoint_config`` (with ``kind``) goes into every config.json.

    callbacks: called as ``cb(trainer, step)`` on EVERY rank every ``eval_every`` steps and at the end
    (write files only where ``trainer.dist.is_main``); use ``trainer.inference_modules()`` for sampling.
    """

    def __init__(
        self,
        task: TrainingTask,
        config: TrainerConfig,
        checkpoint_config: dict,
        extra_json: dict[str, dict] | None = None,
        callbacks: Sequence[Callable[[Trainer, int], None]] = (),
        dist_info: wdist.DistInfo | None = None,
    ):
        if not isinstance(checkpoint_config.get("kind"), str):
            raise ValueError("checkpoint_config needs a 'kind' string such as 'worldmodel.pretrain'")
        self.task, self.cfg, self.callbacks = task, config, list(callbacks)
        self.checkpoint_config, self.extra_json = dict(checkpoint_config), dict(extra_json or {})
        self.dist = dist_info or wdist.init_distributed(config.device)
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoint"
        self.step = 0
        self.history: list[dict[str, float]] = []  # per optimizer step: loss (mean over ranks), lr, grad_norm
        self.window = MetricMeans()  # metrics since the last log line, each over the micro-steps that reported it
        seed_everything(config.seed, self.dist.rank)

        self.modules = dict(task.modules())
        self.ema_name = task.ema_target() if config.ema else None
        if self.ema_name is not None and self.ema_name not in self.modules:
            raise ValueError(f"task.ema_target() = {self.ema_name!r} is not one of task.modules(): "
                             f"{list(self.modules)}")
        for module in self.modules.values():
            module.to(self.dist.device)  # in place: the task's references stay valid
            wdist.broadcast_module(module)
        self.emas = self._build_emas(task)  # {name: EMA}; the ema_name one is the teacher
        self.ema = self.emas.get(self.ema_name)
        if config.fsdp:
            if self.ema_name is None:
                raise ValueError("fsdp=True shards the task's ema_target module; this task has none (or ema=false)")
            wdist.shard_fsdp2(self.modules[self.ema_name], self.dist.device)
            wdist.shard_fsdp2(self.ema.model, self.dist.device)
        if config.compile and self.ema_name is not None:
            self.modules[self.ema_name].compile()
            self.ema.model.compile()
        if hasattr(task, "bind_inference"):
            task.bind_inference(self.inference_modules())

        self.params = _unique_trainable(self.modules)
        if not self.params:
            raise ValueError("the task's modules have no trainable parameters")
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=lr_at(0, config), betas=config.betas, eps=config.eps,
            fused=self.dist.device.type == "cuda",
        )
        self.autocast = self.dist.device.type == "cuda" and config.precision == "bf16"
        self.metrics = MetricsLogger(self.output_dir, enabled=self.dist.is_main, tensorboard=config.tensorboard,
                                     wandb_project=config.wandb_project, run_config=dataclasses.asdict(config))
        resume = config.resume
        if resume == "auto":
            resume = str(self.checkpoint_dir) if (self.checkpoint_dir / "config.json").exists() else None
        if resume:
            self.load(resume)

    # ------------------------------------------------------------------------------------------ loop

    def fit(self) -> list[dict[str, float]]:
        """Train from ``self.step`` to ``max_steps``; returns ``self.history``."""
        cfg, start = self.cfg, self.step
        batches = iter(self.task.batches(start, self.dist.rank, self.dist.world_size))
        bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and self.dist.is_main),
                   dynamic_ncols=True, desc="train")
        self.window.clear()
        window_steps, t0 = 0, time.perf_counter()
        for step in range(start, cfg.max_steps):
            record = self.train_step(step, batches)
            window_steps += 1
            self.step = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if cfg.log_every and self.step % cfg.log_every == 0:
                elapsed = time.perf_counter() - t0
                logged = self.window.means()
                logged["steps_per_s"] = window_steps / max(elapsed, 1e-9)
                self.metrics.log(self.step, logged)
                self.window.clear()
                window_steps, t0 = 0, time.perf_counter()
            last = self.step == cfg.max_steps
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not last:
                self.save()
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                for callback in self.callbacks:
                    callback(self, self.step)
        bar.close()
        if start < cfg.max_steps or not (self.checkpoint_dir / "config.json").exists():
            self.save()
        if self.dist.is_main and cfg.log_every and self.metrics.path.exists():
            plot_loss_curves(self.metrics.path, self.output_dir / "loss_curves.png")
        return self.history

    def train_step(self, step: int, batches: Iterator[Any]) -> dict[str, float]:
        """One optimizer step over ``accum_steps`` micro-batches; returns the step's metrics (each the mean over
        the micro-batches that reported it) and adds them to ``self.window`` (what the next log line averages)."""
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        means = MetricMeans()
        teacher = self.ema.model if self.ema is not None else None
        loss_sum = torch.zeros((), device=self.dist.device)
        for _ in range(cfg.accum_steps):
            batch = next(batches)
            with torch.autocast(device_type=self.dist.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, metrics = self.task.loss(batch, step, teacher)
            (loss / cfg.accum_steps).backward()
            loss_sum += loss.detach().float()
            means.add(metrics)
            self.window.add({k: v for k, v in metrics.items() if k not in STEP_KEYS})
        wdist.average_gradients(self.params, self.dist.world_size)
        norm = _clip_gradients([p for p in self.params if p.grad is not None], cfg.grad_clip)
        mean_loss = wdist.all_reduce_mean(loss_sum / cfg.accum_steps)
        loss_value = float(mean_loss)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite loss {loss_value} at step {step}: lower lr or check the data")
        self.optimizer.step()
        if self.ema is not None:
            if self.cfg.fsdp:  # a no-grad teacher forward leaves FSDP's root parameters unsharded
                wdist.reshard_fsdp2(self.ema.model)
                wdist.reshard_fsdp2(self.modules[self.ema_name])
            for name, ema in self.emas.items():
                ema.update(self.modules[name])
        record = means.means()
        record.update(loss=loss_value, lr=lr, grad_norm=float(norm))
        self.window.add({k: record[k] for k in STEP_KEYS})
        self.history.append({"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(norm)})
        if len(self.history) > 2 * HISTORY_KEEP:  # bounded memory on long runs (metrics.jsonl has it all)
            del self.history[:-HISTORY_KEEP]
        return record

    # ----------------------------------------------------------------------------------- checkpoints

    def inference_modules(self) -> dict[str, nn.Module]:
        """The weights to sample / evaluate with (and saved in model.safetensors): EMA copies where kept."""
        return {n: (self.emas[n].model if n in self.emas else m) for n, m in self.modules.items()}

    def _build_emas(self, task: TrainingTask) -> dict[str, Any]:
        """{name: EMA} for the teacher module and every other ema_targets module with trainable parameters."""
        if self.ema_name is None:
            return {}
        from worldmodel.selfflow import EMA

        names = tuple(task.ema_targets()) if hasattr(task, "ema_targets") else ()
        names = (self.ema_name, *[n for n in names if n != self.ema_name])
        unknown = [n for n in names if n not in self.modules]
        if unknown:
            raise ValueError(f"task.ema_targets() names {unknown}, not in task.modules(): {list(self.modules)}")
        return {n: EMA(self.modules[n], decay=self.cfg.ema_decay, warmup=self.cfg.ema_warmup) for n in names
                if n == self.ema_name or any(p.requires_grad for p in self.modules[n].parameters())}

    def save(self, path: str | Path | None = None) -> Path:
        """Write a resumable checkpoint (collective: call on every rank; rank 0 writes)."""
        path = Path(path) if path is not None else self.checkpoint_dir
        if self.cfg.fsdp:  # callbacks may have left no-grad forwards unsharded
            wdist.reshard_fsdp2(self.ema.model)
            wdist.reshard_fsdp2(self.modules[self.ema_name])
        inference = {n: wdist.full_state_dict(m) for n, m in self.inference_modules().items()}
        student = {n: wdist.full_state_dict(m) for n, m in self.modules.items()}
        optimizer = self._optimizer_state()
        rng = self._gather_rng()
        if self.dist.is_main:
            meta = {
                "ema": None if self.ema is None else {"step": self.ema.step, "decay": self.ema.decay,
                                                      "warmup": self.ema.warmup, "module": self.ema_name,
                                                      "modules": list(self.emas)},
                "scheduler": {"step": self.step, "lr": lr_at(max(self.step - 1, 0), self.cfg)},
                "trainer": {k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in dataclasses.asdict(self.cfg).items()},
                "world_size": self.dist.world_size,
            }
            config = {**self.checkpoint_config, "train_step": self.step}
            state = TrainState(step=self.step, modules=student, optimizer=optimizer, rng=rng, meta=meta)
            save_checkpoint(path, inference, config, extra_json=self.extra_json, train_state=state)
            log.info("saved checkpoint at step %d to %s", self.step, path)
        wdist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint written by ``save`` (same task modules, same kind)."""
        ckpt = load_checkpoint(path, expected_kind=self.checkpoint_config["kind"], train_state=True)
        state = ckpt.train_state
        absent = sorted(set(self.modules) - set(state.modules))
        if absent:
            raise ValueError(f"{path} has no train state for module(s) {absent}; it holds {sorted(state.modules)}")
        for name, module in self.modules.items():
            _load_module(module, state.modules[name], f"{path}/train_state [{name}]")
        if self.emas:
            absent = sorted(set(self.emas) - set(ckpt.weights))
            if absent:
                raise ValueError(f"{path}/model.safetensors lacks EMA weights for {absent}; "
                                 f"it holds {sorted(ckpt.weights)}")
            ema_step = int((state.meta.get("ema") or {}).get("step", state.step))
            for name, ema in self.emas.items():  # a module saved raw (older runs) starts its EMA from those weights
                _load_module(ema.model, ckpt.weights[name], f"{path}/model.safetensors [{name}]")
                ema.step = ema_step
        self._load_optimizer_state(state.optimizer)
        if self.dist.rank < len(state.rng):
            set_rng_state_tensors(state.rng[self.dist.rank])
        else:
            log.warning("checkpoint has RNG states for %d ranks; rank %d reseeds", len(state.rng), self.dist.rank)
            seed_everything(self.cfg.seed + state.step, self.dist.rank)
        self.step = state.step
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    def _optimizer_state(self) -> dict:
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(nn.ModuleDict(self.modules), self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state: dict) -> None:
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(nn.ModuleDict(self.modules), self.optimizer, state, options=opts)
            return
        self.optimizer.load_state_dict(state)

    def _gather_rng(self) -> list[dict[str, Tensor]]:
        mine = rng_state_tensors()
        if self.dist.world_size == 1 or not dist.is_initialized():
            return [mine]
        ranks: list[dict[str, Tensor]] = [{} for _ in range(self.dist.world_size)]
        for key in sorted(mine):
            local = mine[key].to(self.dist.device)
            parts = [torch.empty_like(local) for _ in range(self.dist.world_size)]
            dist.all_gather(parts, local)
            for r, part in enumerate(parts):
                ranks[r][key] = part.cpu()
        return ranks


def _unique_trainable(modules: dict[str, nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules.values():
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Global gradient L2 norm (over FSDP shards too); scales gradients to ``max_norm`` when it is > 0."""
    if not params:
        return 0.0
    sharded = [p for p in params if wdist._is_dtensor(p)]
    plain = [p for p in params if not wdist._is_dtensor(p)]
    square = torch.zeros((), dtype=torch.float32, device=params[0].grad.device)
    for group in (sharded, plain):
        if group:
            n = torch.nn.utils.get_total_norm([p.grad for p in group])
            n = n.full_tensor() if hasattr(n, "full_tensor") else n
            square = square + n.float().square()
    total = float(square.sqrt())
    if max_norm > 0:
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for group in (sharded, plain):
                if group:
                    torch._foreach_mul_([p.grad for p in group], coef)
    return total


def _load_module(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Strict load; for FSDP2 modules the full tensors are scattered into their shards."""
    own = module.state_dict()
    if any(hasattr(t, "full_tensor") for t in own.values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))
        return
    load_state_strict(module, state, where)


__all__ = ["TrainingTask", "TrainerConfig", "Trainer", "lr_at", "seed_everything", "rng_state_tensors",
           "set_rng_state_tensors"]

