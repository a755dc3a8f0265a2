"""The one training loop for pretraining and fine-tuning, driven by a small task protocol.

A task owns its modules, data and loss; the Trainer owns optimisation: AdamW (fused on CUDA),
linear warmup + cosine decay, gradient accumulation and clipping, bf16 autocast on CUDA (fp32
master weights), ``torch.compile`` of the backbone's blocks (default on CUDA), EMA weights (the Self-Flow
teacher and the weights written for inference, worldmodel.ema), atomic checkpoints with exact resume,
data parallelism under torchrun (DDP hooks or FSDP2 on the EMA-tracked backbone, worldmodel.train_step),
a progress bar, metrics JSONL + loss-curve PNG (each metric averaged over the micro-steps that reported it,
on the device, read at logging time), and periodic callbacks for evaluation / sampling.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from worldmodel import distributed as wdist
from worldmodel.checkpoint import TrainState, latest_checkpoint, load_checkpoint, load_state_strict, save_checkpoint
from worldmodel.ema import EMA
from worldmodel.loss_plot import plot_loss_curves
from worldmodel.metrics_log import MetricsLogger
from worldmodel.rng import gather_rng_states, rng_state_tensors, seed_everything, set_rng_state_tensors
from worldmodel.train_step import DeviceMeans, GradientSync, clip_gradients, compile_blocks
from worldmodel.trainer_config import TrainerConfig, lr_at

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
        """The text encoder paired with ``model``: the trained one for the trained backbone (or None), else the
        inference (EMA) text encoder, also for a gathered copy of the EMA backbone (Trainer.evaluation_modules)."""
        if model is None or model is self.model:
            return self.text_encoder
        return (self._inference or {}).get("text_encoder", self.text_encoder)


class Trainer:
    """Runs ``task`` under ``config``; ``checkpoint_config`` (with ``kind``) goes into every config.json.

    callbacks: called as ``cb(trainer, step)`` on EVERY rank every ``eval_every`` steps and at the end
    (write files only where ``trainer.dist.is_main``). Sample / evaluate with ``trainer.evaluation_modules()``,
    called on every rank (under FSDP it gathers the sharded weights once per round); after it, one rank may
    run forward passes alone.
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
        self.window = DeviceMeans(self.dist.device)  # metrics since the last log line, on the device
        self._pending: list[tuple[int, float, Tensor, Tensor]] = []  # steps not yet read into history
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
        self._plain: nn.Module | None = None  # unsharded copy of the backbone for evaluation under FSDP
        self._plain_key: tuple[int, bool] | None = None
        if config.fsdp:
            if self.ema_name is None:
                raise ValueError("fsdp=True shards the task's ema_target module; this task has none (or ema=false)")
            self._plain = copy.deepcopy(self.ema.model).eval().requires_grad_(False)
            wdist.shard_fsdp2(self.modules[self.ema_name], self.dist.device)
            wdist.shard_fsdp2(self.ema.model, self.dist.device)
        if hasattr(task, "bind_inference"):
            task.bind_inference(self.inference_modules())

        self.params = _unique_trainable(self.modules)
        if not self.params:
            raise ValueError("the task's modules have no trainable parameters")
        backbone = task.ema_target()  # DDP-hooked and compiled even without EMA
        backbone = backbone if backbone in self.modules else None
        self.sync = GradientSync(self.modules, self.params, backbone, self.dist, config.fsdp)
        if config.compiles_on(self.dist.device) and backbone is not None:
            compile_blocks(self.modules[backbone])
            if self.ema is not None:
                compile_blocks(self.ema.model)
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
        if resume == "auto":  # the newest complete copy, whatever an interrupted save left
            resume = latest_checkpoint(self.checkpoint_dir)
        if resume:
            self.load(resume)
        else:
            self.metrics.reset()  # a fresh start rewrites metrics.jsonl rather than appending to an old run's

    # ------------------------------------------------------------------------------------------ loop

    def fit(self) -> list[dict[str, float]]:
        """Train from ``self.step`` to ``max_steps``; returns ``self.history``. Closes the metrics logger."""
        cfg, start = self.cfg, self.step
        batches = iter(self.task.batches(start, self.dist.rank, self.dist.world_size))
        bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and self.dist.is_main),
                   dynamic_ncols=True, desc="train")
        self.window.clear()
        window_steps, t0 = 0, time.perf_counter()
        try:
            for step in range(start, cfg.max_steps):
                self.train_step(step, batches)
                window_steps += 1
                self.step = step + 1
                bar.update(1)
                if cfg.log_every and self.step % cfg.log_every == 0:
                    self._read_history()
                    logged = self.window.means()  # the one host sync of the window
                    logged["steps_per_s"] = window_steps / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{logged.get('loss', float('nan')):.4f}", lr=f"{logged['lr']:.2e}")
                    self.metrics.log(self.step, logged)
                    self.window.clear()
                    window_steps, t0 = 0, time.perf_counter()
                last = self.step == cfg.max_steps
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not last:
                    self.save()
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                    self._read_history()
                    for callback in self.callbacks:
                        callback(self, self.step)
            bar.close()
            self._read_history()
            if start < cfg.max_steps or not (self.checkpoint_dir / "config.json").exists():
                self.save()
            if self.dist.is_main and cfg.log_every and self.metrics.path.exists():
                plot_loss_curves(self.metrics.path, self.output_dir / "loss_curves.png")
        finally:
            bar.close()
            self.metrics.close()
        return self.history

    def train_step(self, step: int, batches: Iterator[Any]) -> dict[str, Tensor | float]:
        """One optimizer step over ``accum_steps`` micro-batches, without a host sync: returns the step's loss
        (mean over micro-batches and ranks) and gradient norm as device tensors and adds every metric to
        ``self.window`` (what the next log line averages); ``self.history`` gets the step when it is read."""
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        teacher = self.ema.model if self.ema is not None else None
        loss_sum = torch.zeros((), device=self.dist.device)
        for micro in range(cfg.accum_steps):
            batch = next(batches)
            self.sync.micro_step(last=micro == cfg.accum_steps - 1)
            with torch.autocast(device_type=self.dist.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, metrics = self.task.loss(batch, step, teacher)
            (loss / cfg.accum_steps).backward()
            loss_sum += loss.detach().float()
            self.window.add({k: v for k, v in metrics.items() if k not in STEP_KEYS})
        self.sync.finish()
        norm = clip_gradients(self.params, cfg.grad_clip)
        mean_loss = wdist.all_reduce_mean(loss_sum / cfg.accum_steps)
        self.optimizer.step()
        if self.ema is not None:
            if self.cfg.fsdp:  # a no-grad teacher forward leaves FSDP's root parameters unsharded
                wdist.reshard_fsdp2(self.ema.model)
                wdist.reshard_fsdp2(self.modules[self.ema_name])
            for name, ema in self.emas.items():
                ema.update(self.modules[name])
        record = {"loss": mean_loss, "lr": lr, "grad_norm": norm}
        self.window.add(record)
        self._pending.append((step, lr, mean_loss, norm))
        return record

    def _read_history(self) -> None:
        """Move the pending steps' loss and gradient norm to ``self.history`` (one host sync); a non-finite loss
        raises here, before any checkpoint of its weights is written."""
        if not self._pending:
            return
        values = torch.stack([torch.stack([loss.float(), norm.float().to(loss.device)])
                              for _, _, loss, norm in self._pending]).cpu().tolist()  # (S, 2)
        pending, self._pending = self._pending, []
        for (step, lr, _, _), (loss, norm) in zip(pending, values):
            if not loss == loss or loss in (float("inf"), float("-inf")):
                raise FloatingPointError(f"non-finite loss {loss} at step {step}: lower lr or check the data")
            self.history.append({"step": step, "loss": loss, "lr": lr, "grad_norm": norm})
        if len(self.history) > 2 * HISTORY_KEEP:  # bounded memory on long runs (metrics.jsonl has it all)
            del self.history[:-HISTORY_KEEP]

    # ------------------------------------------------------------------------------ inference weights

    def inference_modules(self) -> dict[str, nn.Module]:
        """The weights saved in model.safetensors: EMA copies where kept (FSDP-sharded under fsdp=True)."""
        return {n: (self.emas[n].model if n in self.emas else m) for n, m in self.modules.items()}

    def evaluation_modules(self, use_ema: bool = True) -> dict[str, nn.Module]:
        """The weights to sample / evaluate with (EMA ones when ``use_ema``), usable by one rank alone.

        Under FSDP a collective: call it on every rank; the sharded backbone is gathered once per step into an
        unsharded copy. Otherwise the modules themselves (the DDP-hooked backbone runs no collective without grad).
        """
        modules = self.inference_modules() if use_ema else dict(self.modules)
        if self._plain is None:
            return modules
        key = (self.step, bool(use_ema))
        if self._plain_key != key:
            self._plain.load_state_dict(wdist.full_state_dict(modules[self.ema_name]), strict=True)
            self._plain_key = key
        return {**modules, self.ema_name: self._plain}

    def _build_emas(self, task: TrainingTask) -> dict[str, EMA]:
        """{name: EMA} for the teacher module and every other ema_targets module with trainable parameters."""
        if self.ema_name is None:
            return {}
        names = tuple(task.ema_targets()) if hasattr(task, "ema_targets") else ()
        names = (self.ema_name, *[n for n in names if n != self.ema_name])
        unknown = [n for n in names if n not in self.modules]
        if unknown:
            raise ValueError(f"task.ema_targets() names {unknown}, not in task.modules(): {list(self.modules)}")
        return {n: EMA(self.modules[n], decay=self.cfg.ema_decay, warmup=self.cfg.ema_warmup) for n in names
                if n == self.ema_name or any(p.requires_grad for p in self.modules[n].parameters())}

    # ----------------------------------------------------------------------------------- checkpoints

    def save(self, path: str | Path | None = None) -> Path:
        """Write a resumable checkpoint (collective: call on every rank; rank 0 writes)."""
        path = Path(path) if path is not None else self.checkpoint_dir
        self._read_history()  # a non-finite loss raises before its weights are written
        if self.cfg.fsdp:  # callbacks may have left no-grad forwards unsharded
            wdist.reshard_fsdp2(self.ema.model)
            wdist.reshard_fsdp2(self.modules[self.ema_name])
        inference = {n: wdist.full_state_dict(m) for n, m in self.inference_modules().items()}
        student = {n: wdist.full_state_dict(m) for n, m in self.modules.items()}
        optimizer = self._optimizer_state()
        rng = gather_rng_states(self.dist.world_size, self.dist.device)
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


def _unique_trainable(modules: dict[str, nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules.values():
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _load_module(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Strict load; for FSDP2 modules the full tensors are scattered into their shards."""
    own = module.state_dict()
    if any(hasattr(t, "full_tensor") for t in own.values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))
        return
    load_state_strict(module, state, where)


__all__ = ["TrainingTask", "BackboneTask", "TrainerConfig", "Trainer", "lr_at", "seed_everything",
           "rng_state_tensors", "set_rng_state_tensors", "EMA"]

