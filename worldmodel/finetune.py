"""RT-1 video-action fine-tuning: the training task over RLDS windows and a mixture of modes.

Each micro-batch holds ONE mode (policy / joint / dynamics / video, worldmodel.action_modes), drawn
with configured probabilities, so every batch has one static layout and the policy mode is trained
with exactly the layout the policy samples with (no future frames at all).
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch import Tensor, nn

from worldmodel.action_modes import WindowLayout, build_sequence, draw_mode
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
        """make_loader(start_step, rank, world_size) -> iterable of collated RT-1 window batches."""
        self.model, self.objective, self.text_encoder, self.codec = model, objective, text_encoder, codec
        self.make_loader, self.geometry, self.mode_probs = make_loader, geometry, dict(mode_probs)
        self.instruction_dropout, self.seed, self.accum_steps = instruction_dropout, seed, accum_steps
        self.use_state = bool(use_state)  # condition on proprioception (batch["state"], (B, Tc, 8) normalized)
        draw_mode(self.mode_probs, torch.Generator().manual_seed(0))  # validate the mode names now

    def batches(self, start_step: int, rank: int, world_size: int):
        micro = start_step * self.accum_steps
        for batch in _repeat(self.make_loader, start_step, rank, world_size):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + micro)
            batch["mode"] = draw_mode(self.mode_probs, generator)
            batch["micro_step"] = micro
            micro += 1
            yield batch

    def sequence(self, batch: dict, mode: str, device, drop_instructions: bool = True, model: nn.Module | None = None):
        """The TokenSequence of ``mode`` for a collated window batch (x holds clean values).

        Dropped and blank instructions take the backbone's null text (``text_drop``); the text encoder is the one
        paired with ``model`` (the EMA one for the EMA backbone; None = the trained one).
        """
        instructions = list(batch["instruction"])
        kept = instructions
        if drop_instructions and self.instruction_dropout > 0:
            generator = torch.Generator().manual_seed(self.seed * 7_919 + int(batch.get("micro_step", 0)))
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

    def loss(self, batch: dict, step: int, ema: nn.Module | None) -> tuple[Tensor, dict[str, float]]:
        device = next(self.model.parameters()).device
        mode = batch["mode"]
        seq = self.sequence(batch, mode, device)
        generator = torch.Generator(device=device).manual_seed(self.seed * 31 + int(batch["micro_step"]))
        loss, metrics = self.objective.loss(self.model, ema, seq, generator=generator)
        metrics = dict(metrics)
        metrics[f"loss/{mode}"] = metrics.get("loss", float(loss.detach()))
        return loss, metrics


def _repeat(make_loader, start_step: int, rank: int, world_size: int):
    """Loop over the loader forever (a new pass re-seeds by pass number)."""
    for epoch in itertools.count():
        yielded = False
        for batch in make_loader(start_step + epoch * 1_000_000, rank, world_size):
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the RT-1 training loader produced no windows: is the training split empty?")


def init_from_pretrained(model: nn.Module, text_encoder: nn.Module, path) -> list[str]:
    """Load a pretraining checkpoint into the fine-tuning model; the action heads start fresh.

    Everything else must match exactly (a clear error names mismatched keys); returns the keys left at init.
    """
    from worldmodel.builders import PRETRAIN_KIND
    from worldmodel.checkpoint import load_checkpoint, load_state_strict, load_weights_partial

    ckpt = load_checkpoint(path, expected_kind=PRETRAIN_KIND)
    state = {k: v for k, v in ckpt.weights["model"].items() if not k.startswith(NEW_HEADS)}
    left = load_weights_partial(model, state, allow_missing_prefixes=NEW_HEADS, where=f"{path} [model]")
    load_state_strict(text_encoder, ckpt.weights["text_encoder"], f"{path} [text_encoder]")
    return left


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
    from worldmodel.action_modes import ACTION_TOKEN_DIM, MODES
    from worldmodel.actions import load_or_compute_stats
    from worldmodel.data.rt1_reader import RT1Windows, collate_rt1
    from worldmodel.data.rt1_synthetic import ensure_embedded_sample
    from worldmodel.rt1_eval import evaluate_offline, write_prediction_video
    from worldmodel.state import STATE_DIM, load_or_compute_state_stats
    from worldmodel.trainer import Trainer

    output_dir = Path(output_dir)
    device = builders.resolve_device(str(cfg.device))
    torch.manual_seed(int(cfg.seed))
    run_cfg = builders.plain(cfg)
    if cfg.init_from:
        pre = json.loads((Path(cfg.init_from) / "config.json").read_text())
        if pre.get("kind") != builders.PRETRAIN_KIND:
            raise ValueError(f"init_from={cfg.init_from} holds a {pre.get('kind')!r} checkpoint; "
                             f"pass a pretraining checkpoint dir (outputs/pretrain/<time>/checkpoint)")
        if pre["model"]["size"] != cfg.model.size:
            raise ValueError(f"init_from is a {pre['model']['size']!r} model but model={cfg.model.size}; "
                             f"set model={pre['model']['size']}")
        run_cfg["codec"], run_cfg["text"] = pre["run"]["codec"], {**pre["run"]["text"],
                                                                  "caption_dropout": cfg.text.caption_dropout}
    else:
        log.warning("no init_from: fine-tuning from scratch (pass init_from=outputs/pretrain/<time>/checkpoint "
                    "to start from a pretrained world model)")
    codec = builders.build_frames_codec(OmegaConf.create(run_cfg["codec"]))
    text_encoder = builders.build_text(OmegaConf.create(run_cfg["text"]))
    model = builders.build_backbone(cfg.model, {"video": codec.token_dim, "action": ACTION_TOKEN_DIM,
                                                "state": STATE_DIM}, text_encoder.feature_dim)
    if cfg.init_from:
        left = init_from_pretrained(model, text_encoder, cfg.init_from)
        log.info("initialised from %s; new (untrained) tensors: %s", cfg.init_from, left)

    d = cfg.data
    data_dir = d.rt1_dir or ensure_embedded_sample(num_episodes=int(d.synthetic_episodes), steps=int(d.synthetic_steps),
                                                  blocks=int(d.get("synthetic_blocks", 3)))
    run_cfg["data"]["resolved_dir"] = str(data_dir)
    normalizer = load_or_compute_stats(data_dir, eval_fraction=float(d.eval_fraction))
    use_state = bool(d.get("state", False))
    state_normalizer = load_or_compute_state_stats(data_dir, float(d.eval_fraction)) if use_state else None
    geometry = WindowLayout(int(d.context_frames), int(d.future_frames), int(d.frame_stride), int(d.horizon))

    def windows(split: str, rank: int = 0, world_size: int = 1, seed: int = 0):
        return RT1Windows(data_dir, split=split, normalizer=normalizer, height=int(d.height), width=int(d.width),
                          context_frames=geometry.context_frames, future_frames=geometry.future_frames,
                          frame_stride=geometry.frame_stride, horizon=geometry.horizon,
                          eval_fraction=float(d.eval_fraction), rank=rank, world_size=world_size, seed=seed,
                          shuffle_buffer=int(d.shuffle_buffer) if split == "train" else 0,
                          num_parallel_calls=int(d.num_parallel_calls), state=use_state,
                          state_normalizer=state_normalizer)

    def make_loader(start_step: int, rank: int, world_size: int):
        dataset = windows("train", rank, world_size, seed=int(cfg.seed) * 100_003 + start_step)
        return torch.utils.data.DataLoader(dataset, batch_size=int(d.batch_size), collate_fn=collate_rt1,
                                           num_workers=int(d.workers), drop_last=True)

    def eval_batches():
        return torch.utils.data.DataLoader(windows("eval"), batch_size=int(d.batch_size), collate_fn=collate_rt1)

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
        if not trainer.dist.is_main:
            return
        weights = trainer.ema.model if trainer.ema is not None else model
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
    trainer = Trainer(task, trainer_cfg, checkpoint_config, extra_json=extra_json, callbacks=[evaluate, *callbacks])
    trainer.fit()
    return {"checkpoint": str(trainer.checkpoint_dir), "offline_eval": results, "output_dir": str(output_dir)}
