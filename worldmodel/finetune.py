"""RT-1 video-action fine-tuning: the training task over RLDS windows and a mixture of modes.

Each micro-batch holds ONE mode (policy / joint / dynamics / video, worldmodel.action_modes), drawn
with configured probabilities (the same on every rank), so every batch has one static layout and the policy
mode is trained with exactly the layout the policy samples with (no future frames at all).

The data stream is a function of the micro-step alone: pass p of the loader is shuffled by (seed, p), and a
run resumed at step k replays the stream up to micro-step k * accum_steps, so it sees exactly the batches the
uninterrupted run saw (exact resume; the replay reads, but does not train on, the windows before k).
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch import Tensor, nn

from worldmodel.action_modes import WindowLayout, build_sequence, draw_mode
from worldmodel.rng import draw_generator
from worldmodel.text import blank_captions, drop_captions
from worldmodel.trainer import BackboneTask

log = logging.getLogger(__name__)


class FinetuneTask(BackboneTask):
    """The Trainer's task for video-action fine-tuning on windows of an RT-1-schema dataset."""

    def __init__(
        self,
        model: nn.Module,
        objective: nn.Module,
        text_encoder: nn.Module,
        codec,
        make_loader,
        geometry: WindowLayout,
        mode_probs: dict[str, float],
        instruction_dropout: float,
        seed: int,
        accum_steps: int = 1,
        use_state: bool = False,
    ):
        """make_loader(pass_index, rank, world_size) -> iterable of collated RT-1 window batches: one pass over this
        rank's shard, shuffled by (seed, pass_index) only, so every pass can be replayed."""
        self.model, self.objective, self.text_encoder, self.codec = model, objective, text_encoder, codec
        self.make_loader, self.geometry, self.mode_probs = make_loader, geometry, dict(mode_probs)
        self.instruction_dropout, self.seed, self.accum_steps = instruction_dropout, seed, accum_steps
        self.use_state = bool(use_state)  # condition on proprioception (batch["state"], (B, Tc, 8) normalized)
        draw_mode(self.mode_probs, torch.Generator().manual_seed(0))  # validate the mode names now

    def batches(self, start_step: int, rank: int, world_size: int):
        """This rank's micro-batches from optimizer step ``start_step`` on: the stream replayed from its start and
        the first ``start_step * accum_steps`` micro-batches skipped, so a resumed run continues it exactly."""
        first = start_step * self.accum_steps
        for micro, batch in enumerate(_passes(self.make_loader, rank, world_size)):
            if micro < first:
                continue
            batch["mode"] = draw_mode(self.mode_probs, draw_generator(self.seed, "mode", micro))  # same on all ranks
            batch["micro_step"], batch["rank"] = micro, rank
            yield batch

    def sequence(self, batch: dict, mode: str, device, drop_instructions: bool = True, model: nn.Module | None = None):
        """The TokenSequence of ``mode`` for a collated window batch (x holds clean values).

        Dropped and blank instructions take the backbone's null text (``text_drop``); the text encoder is the one
        paired with ``model`` (the EMA one for the EMA backbone; None = the trained one).
        """
        instructions = list(batch["instruction"])
        kept = instructions
        if drop_instructions and self.instruction_dropout > 0:
            generator = draw_generator(self.seed, "caption_dropout", int(batch.get("micro_step", 0)),
                                       int(batch.get("rank", 0)))  # per rank: ranks drop different instructions
            kept = drop_captions(instructions, self.instruction_dropout, generator)  # dropped -> None
        drop = blank_captions(kept)  # (B,) dropped or blank
        text, text_mask = self.text_encoder_for(model).encode(instructions, device=device)
        future = batch.get("future")
        seq = build_sequence(
            mode, self.codec, batch["context"].to(device), None if future is None else future.to(device),
            batch["actions"].to(device), batch["terminate"].to(device), batch["action_valid"].to(device),
            self.geometry, text=text, text_mask=text_mask,
            state=batch["state"].to(device) if self.use_state else None,
        )
        return seq.with_values(seq.x, text_drop=drop.to(device))

    def loss(self, batch: dict, step: int, ema: nn.Module | None) -> tuple[Tensor, dict[str, Tensor]]:
        device = next(self.model.parameters()).device
        mode = batch["mode"]
        seq = self.sequence(batch, mode, device)
        # noise, times and masks: reproducible per (seed, micro-step) and different on every rank
        generator = draw_generator(self.seed, "objective", int(batch["micro_step"]), int(batch.get("rank", 0)), device)
        # factorize=True: build_sequence gives every token outside the loss mask tau 0 or 1 (no host sync)
        loss, metrics = self.objective.loss(self.model, ema, seq, generator=generator, factorize=True)
        metrics = dict(metrics)
        metrics[f"loss/{mode}"] = metrics.get("loss", loss.detach())
        return loss, metrics


def _passes(make_loader, rank: int, world_size: int):
    """Loop over the loader forever, pass p shuffled by p (the stream depends on nothing else)."""
    for epoch in itertools.count():
        yielded = False
        for batch in make_loader(epoch, rank, world_size):
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the RT-1 training loader produced no windows: is the training split empty?")


def init_from_pretrained(model: nn.Module, text_encoder: nn.Module, ckpt) -> list[str]:
    """Load a pretraining checkpoint (a path or a loaded ``Checkpoint``) into the fine-tuning model; the action
    heads start fresh. Everything else must match exactly (a clear error names mismatched keys); returns the keys
    left at init."""
    from worldmodel.builders import PRETRAIN_KIND
    from worldmodel.checkpoint import load_checkpoint, load_state_strict, load_weights_partial

    if not hasattr(ckpt, "weights"):
        ckpt = load_checkpoint(ckpt, expected_kind=PRETRAIN_KIND)
    state = {k: v for k, v in ckpt.weights["model"].items() if not k.startswith(NEW_HEADS)}
    left = load_weights_partial(model, state, allow_missing_prefixes=NEW_HEADS, where=f"{ckpt.path} [model]")
    load_state_strict(text_encoder, ckpt.weights["text_encoder"], f"{ckpt.path} [text_encoder]")
    return left


def pretrained_start(cfg, run_cfg: dict):
    """The checkpoint named by ``cfg.init_from`` (loaded once, checked for kind and model size), or None; its codec
    and text settings replace ``run_cfg``'s (caption dropout stays the fine-tuning one)."""
    from worldmodel import builders
    from worldmodel.checkpoint import load_checkpoint

    if not cfg.init_from:
        log.warning("no init_from: fine-tuning from scratch (pass init_from=outputs/pretrain/<time>/checkpoint "
                    "to start from a pretrained world model)")
        return None
    ckpt = load_checkpoint(cfg.init_from, expected_kind=builders.PRETRAIN_KIND)
    size = ckpt.config["model"]["size"]
    if size != cfg.model.size:
        raise ValueError(f"init_from is a {size!r} model but model={cfg.model.size}; set model={size}")
    run_cfg["codec"] = ckpt.config["run"]["codec"]
    run_cfg["text"] = {**ckpt.config["run"]["text"], "caption_dropout": cfg.text.caption_dropout}
    return ckpt


# the action and state modalities' projections, new in fine-tuning
NEW_HEADS = ("inputs.action.", "outputs.action.", "inputs.state.", "outputs.state.")


def run_finetuning(cfg, output_dir, callbacks=()) -> dict:
    """Build everything from the Hydra config, fine-tune, evaluate offline and write a policy checkpoint.

    callbacks: extra ``fn(trainer, step)`` run beside the offline evaluation (every trainer.eval_every steps).
    """
    import json
    from pathlib import Path

    import numpy as np
    from omegaconf import OmegaConf

    from worldmodel import builders
    from worldmodel import distributed as wdist
    from worldmodel.action_modes import ACTION_TOKEN_DIM, MODES
    from worldmodel.rt1_eval import evaluate_offline, write_prediction_video
    from worldmodel.state import STATE_DIM
    from worldmodel.trainer import Trainer

    output_dir = Path(output_dir)
    device = builders.resolve_device(str(cfg.device))
    torch.manual_seed(int(cfg.seed))
    run_cfg = builders.plain(cfg)
    pretrained = pretrained_start(cfg, run_cfg)
    codec = builders.build_frames_codec(OmegaConf.create(run_cfg["codec"]))
    text_encoder = builders.build_text(OmegaConf.create(run_cfg["text"]))
    model = builders.build_backbone(cfg.model, {"video": codec.token_dim, "action": ACTION_TOKEN_DIM,
                                                "state": STATE_DIM}, text_encoder.feature_dim)
    if pretrained is not None:
        left = init_from_pretrained(model, text_encoder, pretrained)
        log.info("initialised from %s; new (untrained) tensors: %s", cfg.init_from, left)
        del pretrained

    data = builders.build_rt1_data(cfg.data, int(cfg.seed))
    run_cfg["data"]["resolved_dir"] = str(data.data_dir)
    normalizer, state_normalizer, geometry = data.normalizer, data.state_normalizer, data.geometry
    use_state = state_normalizer is not None
    make_loader, eval_batches = data.make_loader, data.eval_batches

    trainer_cfg = builders.trainer_config(cfg.trainer, output_dir, int(cfg.seed), device)
    objective = builders.build_objective(cfg.objective, model, trainer_cfg)
    modes = {m: float(cfg.modes.get(m, 0.0)) for m in MODES}
    if geometry.future_frames == 0:
        modes = {m: (p if m == "policy" else 0.0) for m, p in modes.items()}
    task = FinetuneTask(model, objective, text_encoder, codec, make_loader, geometry, modes,
                        float(run_cfg["text"]["caption_dropout"]), int(cfg.seed), trainer_cfg.accum_steps,
                        use_state=use_state)
    mean_action = np.asarray(normalizer.to_dict().get("mean") or np.zeros(7), dtype=np.float64)
    results: dict = {}

    def evaluate(trainer, step: int) -> None:
        weights = trainer.evaluation_modules()["model"]  # every rank: gathers FSDP-sharded weights once
        if not trainer.dist.is_main:
            return
        was_training = weights.training
        weights.eval()
        metrics = evaluate_offline(weights, task, eval_batches(), normalizer, mean_action,
                                   steps=int(cfg.eval.sampling_steps), seed=int(cfg.seed),
                                   max_batches=None if cfg.eval.batches is None else int(cfg.eval.batches))
        metrics["step"] = step
        results.update(metrics)
        trainer.metrics.log(step, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)})
        (output_dir / "offline_eval.json").write_text(json.dumps(metrics, indent=2))
        log.info("offline eval @%d: action MAE %.4f vs predict-the-mean %.4f, gripper sign acc %.3f, "
                 "terminate acc %.3f",
                 step, metrics["action_mae"], metrics["mean_baseline_mae"], metrics["gripper_sign_accuracy"],
                 metrics["terminate_accuracy"])
        if cfg.eval.video and geometry.future_frames > 0:
            write_prediction_video(weights, task, next(iter(eval_batches())), output_dir / "predicted_vs_true.gif")
        weights.train(was_training)

    checkpoint_config = {"kind": builders.FINETUNE_KIND, "model": model.config, "run": run_cfg}
    extra_json = {"action_stats": normalizer.to_dict()}
    if state_normalizer is not None:
        extra_json["state_stats"] = state_normalizer.to_dict()
    with wdist.process_group(str(device)) as dist_info:
        trainer = Trainer(task, trainer_cfg, checkpoint_config, extra_json=extra_json,
                          callbacks=[evaluate, *callbacks], dist_info=dist_info)
        trainer.fit()
    return {"checkpoint": str(trainer.checkpoint_dir), "offline_eval": results, "output_dir": str(output_dir)}
