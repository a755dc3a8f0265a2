"""Multi-modal Self-Flow pretraining: modality streams, the training task, and what a run writes.

Each optimizer micro-step holds ONE modality, drawn with configured probabilities at its own batch
size (the paper: 57/30/13 % image/video/audio at batch 38/8/16). Only the input and output
projections are per modality; the backbone is shared. The task plugs into the one Trainer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from worldmodel.data import collate
from worldmodel.rng import draw_generator
from worldmodel.text import blank_captions, drop_captions
from worldmodel.tokens import TokenSequence
from worldmodel.trainer import BackboneTask

log = logging.getLogger(__name__)



@dataclass
class ModalityStream:
    """One modality's data: a map-style dataset, its codec, batch size and draw probability."""

    modality: str  # "image" | "video" | "audio"
    dataset: torch.utils.data.Dataset
    codec: object  # encode(batch) -> (tokens (B, N, C), pos (N, 3)); decode(tokens, shape) -> batch
    batch_size: int
    prob: float


def draw_stream_indices(seed: int, micro_step: int, streams: list[ModalityStream], rank: int, world_size: int):
    """(stream index, this rank's sample indices) for one micro-step; the same modality on every rank.

    Deterministic in (seed, micro_step): resuming at a step replays the same batches, and the global
    batch of a DDP run equals the single-process batch (rank r takes the r-th slice).
    """
    rng = np.random.default_rng([seed, micro_step])
    probs = np.array([s.prob for s in streams], dtype=np.float64)
    which = int(rng.choice(len(streams), p=probs / probs.sum()))
    stream = streams[which]
    indices = rng.integers(0, len(stream.dataset), size=stream.batch_size * world_size)  # global batch
    return which, indices[rank * stream.batch_size: (rank + 1) * stream.batch_size].tolist()


def collate_media(samples: list[dict], modality: str) -> dict:
    """Collate samples of one modality (worldmodel.data.collate) and check the modality matches."""
    batch = collate(samples)
    if batch["modality"] != modality:
        raise ValueError(f"the {modality!r} stream's dataset yields {batch['modality']!r} samples")
    return batch


class PretrainTask(BackboneTask):
    """The Trainer's task for multi-modal pretraining (model + projector + text encoder are trained)."""

    def __init__(
        self,
        model: nn.Module,
        objective: nn.Module,
        text_encoder: nn.Module,
        streams: list[ModalityStream],
        caption_dropout: float,
        seed: int,
        accum_steps: int = 1,
    ):
        if not streams:
            raise ValueError("pretraining needs at least one modality with prob > 0 (see `modalities` in the config)")
        self.model, self.objective, self.text_encoder = model, objective, text_encoder
        self.streams, self.caption_dropout, self.seed, self.accum_steps = streams, caption_dropout, seed, accum_steps

    def batches(self, start_step: int, rank: int, world_size: int):
        micro = start_step * self.accum_steps
        while True:
            which, indices = draw_stream_indices(self.seed, micro, self.streams, rank, world_size)
            stream = self.streams[which]
            batch = collate_media([stream.dataset[i] for i in indices], stream.modality)
            batch["micro_step"], batch["rank"] = micro, rank
            micro += 1
            yield batch

    def encode_text(self, captions: list[str | None], device, model: nn.Module | None = None):
        """(features (B, L, Dt), mask (B, L), text_drop (B,)) from the text encoder paired with ``model``;
        blank captions are flagged in text_drop (they take the model's null text)."""
        text, mask = self.text_encoder_for(model).encode([c or "" for c in captions], device=device)
        return text, mask, blank_captions(captions).to(device)

    def build_sequence(self, batch: dict, device) -> TokenSequence:
        """Clean tokens of one modality batch, all of them trained (loss_mask True)."""
        modality = batch["modality"]
        codec = self.stream_for(modality).codec
        tokens, pos = codec.encode(batch[modality].to(device))  # (B, N, C), (N, 3)
        b, n, _ = tokens.shape
        generator = draw_generator(self.seed, "caption_dropout", int(batch["micro_step"]), int(batch.get("rank", 0)))
        kept = drop_captions(list(batch["caption"]), self.caption_dropout, generator)  # dropped -> None; per rank
        text, text_mask = self.text_encoder.encode([c or "" for c in batch["caption"]], device=device)
        return TokenSequence(
            x=tokens, tau=torch.zeros(b, n, device=device), pos=pos.to(device), layout=((modality, n),),
            loss_mask=torch.ones(b, n, dtype=torch.bool, device=device), text=text, text_mask=text_mask,
            text_drop=blank_captions(kept).to(device),  # dropped or blank captions train the null text
        )

    def stream_for(self, modality: str) -> ModalityStream:
        for stream in self.streams:
            if stream.modality == modality:
                return stream
        raise ValueError(f"no stream for modality {modality!r}")

    def loss(self, batch: dict, step: int, ema: nn.Module | None) -> tuple[Tensor, dict[str, Tensor]]:
        device = next(self.model.parameters()).device
        seq = self.build_sequence(batch, device)
        # noise, times and masks: reproducible per (seed, micro-step) and different on every rank
        generator = draw_generator(self.seed, "objective", int(batch["micro_step"]), int(batch.get("rank", 0)), device)
        # factorize=True: every token is a loss token (no host sync)
        loss, metrics = self.objective.loss(self.model, ema, seq, generator=generator, factorize=True)
        metrics = dict(metrics)
        modality = batch["modality"]
        metrics[f"loss/{modality}"] = metrics.get("loss", loss.detach())
        if "rep" in metrics:
            metrics[f"rep/{modality}"] = metrics["rep"]
        return loss, metrics


@torch.no_grad()
def generate(
    model: nn.Module,
    task: PretrainTask,
    modality: str,
    captions: list[str],
    steps: int,
    shift: float,
    method: str,
    guidance: float,
    seed: int,
) -> Tensor:
    """Sample one modality for the given captions; returns decoded media in [-1, 1]."""
    from worldmodel.sampling import sample

    stream = task.stream_for(modality)
    device = next(model.parameters()).device
    example = collate_media([stream.dataset[i] for i in range(len(captions))], modality)
    media = example[modality].to(device)
    tokens, pos = stream.codec.encode(media)  # only shapes and positions are used
    b, n, _ = tokens.shape
    text, text_mask, blank = task.encode_text(captions, device, model=model)
    seq = TokenSequence(
        x=torch.zeros_like(tokens), tau=torch.ones(b, n, device=device), pos=pos.to(device),
        layout=((modality, n),), loss_mask=torch.ones(b, n, dtype=torch.bool, device=device),
        text=text, text_mask=text_mask, text_drop=blank,
    )
    generator = torch.Generator(device=device).manual_seed(seed)  # unconditional: text None, the trained null text
    out = sample(model, seq, steps=steps, shift=shift, method=method, guidance=guidance, generator=generator)
    return stream.codec.decode(out.x[..., : model.token_dim[modality]], media.shape).clamp(-1, 1)


def write_samples(model: nn.Module, task: PretrainTask, out_dir: Path, sampling_cfg, seed: int) -> dict[str, Path]:
    """Write a PNG grid of images, a GIF of videos and a WAV of audio clips sampled with their captions."""
    from worldmodel import media_io

    out_dir = Path(out_dir)
    written = {}
    for stream in task.streams:
        m = stream.modality
        count = int(sampling_cfg.num_samples) if m == "image" else max(1, int(sampling_cfg.num_samples) // 4)
        captions = [stream.dataset[i].get("caption", "") for i in range(count)]
        media = generate(model, task, m, captions, int(sampling_cfg.steps), float(sampling_cfg.shift),
                         str(sampling_cfg.method), float(sampling_cfg.guidance[m]), seed).float().cpu().numpy()
        if m == "image":
            written[m] = media_io.write_image_grid(out_dir / "samples_image.png", media)
        elif m == "video":
            written[m] = media_io.write_video_grid(out_dir / "samples_video.gif", media)
        else:
            rate = int(stream.dataset[0].get("sample_rate", 8000))
            written[m] = media_io.write_wav(out_dir / "samples_audio.wav", media, rate)
        (out_dir / f"samples_{m}_captions.txt").write_text("\n".join(captions) + "\n")
        log.info("wrote %s samples to %s", m, written[m])
    return written


def run_pretraining(cfg, output_dir: str | Path) -> dict:
    """Build everything from the Hydra config, train, and write checkpoint, samples and loss curves."""
    from worldmodel import builders
    from worldmodel import distributed as wdist
    from worldmodel.trainer import Trainer

    output_dir = Path(output_dir)
    device = builders.resolve_device(str(cfg.device))
    torch.manual_seed(int(cfg.seed))
    frame_codec, audio_codec = builders.build_frames_codec(cfg.codec), builders.build_audio(cfg.codec)
    text_encoder = builders.build_text(cfg.text)
    token_dim = {"image": frame_codec.token_dim, "video": frame_codec.token_dim, "audio": audio_codec.token_dim}
    model = builders.build_backbone(cfg.model, token_dim, text_encoder.feature_dim)
    trainer_cfg = builders.trainer_config(cfg.trainer, output_dir, int(cfg.seed), device)
    objective = builders.build_objective(cfg.objective, model, trainer_cfg)
    task = PretrainTask(model, objective, text_encoder, builders.build_streams(cfg, frame_codec, audio_codec),
                        float(cfg.text.caption_dropout), int(cfg.seed), trainer_cfg.accum_steps)
    params = sum(p.numel() for p in model.parameters())
    log.info("pretraining %s (%.2fM parameters) with %s on %s", cfg.model.size, params / 1e6, cfg.objective.name,
             ", ".join(f"{s.modality} ({len(s.dataset)} samples)" for s in task.streams))

    def sample_callback(trainer, step: int) -> None:
        weights = trainer.evaluation_modules(use_ema=bool(cfg.sampling.use_ema))["model"]  # every rank (FSDP)
        if trainer.dist.is_main:
            write_samples(weights, task, output_dir, cfg.sampling, int(cfg.seed))

    checkpoint_config = {"kind": builders.PRETRAIN_KIND, "model": model.config, "run": builders.plain(cfg)}
    with wdist.process_group(device) as dist_info:
        trainer = Trainer(task, trainer_cfg, checkpoint_config, callbacks=[sample_callback], dist_info=dist_info)
        history = trainer.fit()
    return {"final_loss": history[-1]["loss"] if history else None, "checkpoint": str(trainer.checkpoint_dir),
            "output_dir": str(output_dir)}
