"""Building the pieces of a run from a Hydra config (shared by pretraining and fine-tuning): the one module to look in.

Every builder takes the config node of one group and returns a plain object; scripts stay thin.
backbone: build_backbone / load_pretrained; objective: build_objective (selfflow_config); text: build_text;
codecs: build_frames_codec / build_audio; data: build_dataset (one pretraining modality), build_streams (the
pretraining mixture), build_rt1_data (fine-tuning: RT-1 windows, statistics, loaders); optimisation:
trainer_config. Checkpoint kinds: PRETRAIN_KIND, FINETUNE_KIND.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from worldmodel.checkpoint import load_checkpoint
from worldmodel.codecs import build_audio_codec, build_frame_codec
from worldmodel.selfflow import SelfFlowConfig, SelfFlowObjective
from worldmodel.sizes import build_model, build_model_from_config
from worldmodel.text import build_text_encoder
from worldmodel.timesteps import TimestepDistribution
from worldmodel.trainer import TrainerConfig

PRETRAIN_KIND = "worldmodel.pretrain"
FINETUNE_KIND = "worldmodel.finetune_rt1"


def plain(node) -> dict:
    """An OmegaConf node (or dict) as a plain, JSON-serialisable dict."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when available else "cpu"; "cuda" without a GPU is an error with the fix."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but torch sees no CUDA GPU; use device=cpu or device=auto")
    return name


def build_backbone(model_cfg, token_dim: dict[str, int], text_dim: int):
    """The WorldModel named by ``model.size`` with its overrides, sized for the codecs and text encoder."""
    overrides = dict(plain(model_cfg.get("overrides") or {}))
    overrides["token_dim"] = {**overrides.get("token_dim", {}), **token_dim}
    overrides.setdefault("text_dim", text_dim)
    return build_model(str(model_cfg.size), **overrides)


def selfflow_config(objective_cfg, ema_decay: float, ema_warmup: bool) -> SelfFlowConfig:
    """SelfFlowConfig from configs/objective/*.yaml; ``flow_matching`` is the plain-FM switch."""
    cfg = plain(objective_cfg)
    name = cfg.pop("name", "selfflow")
    if name not in ("selfflow", "flow_matching"):
        raise ValueError(f"unknown objective {name!r}; use objective=selfflow or objective=flow_matching")
    timesteps = TimestepDistribution(**cfg.pop("timesteps", {}))
    common = dict(timesteps=timesteps, ema_decay=ema_decay, ema_warmup=ema_warmup,
                  student_block=cfg.pop("student_block", None), teacher_block=cfg.pop("teacher_block", None),
                  modality_shift=dict(cfg.pop("modality_shift", None) or {}))
    if name == "flow_matching":
        return SelfFlowConfig.plain_flow_matching(**common)
    return SelfFlowConfig(mask_ratio=cfg.pop("mask_ratio"), gamma=float(cfg.pop("gamma")), **common)


def build_objective(objective_cfg, model, trainer_cfg: TrainerConfig) -> SelfFlowObjective:
    return SelfFlowObjective.for_model(model, selfflow_config(objective_cfg, trainer_cfg.ema_decay,
                                                              trainer_cfg.ema_warmup))


def build_text(text_cfg):
    return build_text_encoder(str(text_cfg.encoder), dim=int(text_cfg.dim), max_len=int(text_cfg.max_len),
                              path=text_cfg.get("path"), layers=int(text_cfg.get("layers", 2)))


def build_frames_codec(codec_cfg):
    return build_frame_codec(str(codec_cfg.frames), patch=int(codec_cfg.patch), path=codec_cfg.get("frames_path"))


def build_audio(codec_cfg):
    return build_audio_codec(str(codec_cfg.audio), frame=int(codec_cfg.audio_frame), path=codec_cfg.get("audio_path"))


def trainer_config(trainer_cfg, output_dir: Path, seed: int, device: str) -> TrainerConfig:
    data = plain(trainer_cfg)
    data.update(output_dir=str(output_dir), seed=int(seed), device=device)
    return TrainerConfig.from_dict(data)


def load_pretrained(path: str | Path, device: str = "cpu"):
    """(model, text_encoder, frame codec, audio codec, run config) of a pretraining checkpoint (EMA weights)."""
    ckpt = load_checkpoint(path, expected_kind=PRETRAIN_KIND)
    run = ckpt.config["run"]
    model = build_model_from_config(ckpt.config["model"])
    text = build_text(OmegaConf.create(run["text"]))
    ckpt.load_into({"model": model, "text_encoder": text})
    codec_cfg = OmegaConf.create(run["codec"])
    return model.to(device).eval(), text.to(device).eval(), build_frames_codec(codec_cfg), build_audio(codec_cfg), run


def build_dataset(d, modality: str):
    """The dataset of one modality from the ``data`` config group (procedural, folders or tfds)."""
    from worldmodel import data as sources

    if d.name == "procedural":
        if modality == "image":
            return sources.ProceduralImages(size=d.image_size, length=d.length, seed=d.seed)
        if modality == "video":
            return sources.ProceduralVideos(size=d.video_size, frames=d.video_frames, length=d.length, seed=d.seed)
        return sources.ProceduralAudio(sample_rate=d.sample_rate, seconds=d.audio_seconds, length=d.length,
                                       seed=d.seed)
    if d.name == "folders":
        root = d.get(f"{modality}_root")
        if not root:
            raise ValueError(f"data=folders with modalities.{modality}.prob > 0 needs data.{modality}_root=... "
                             f"(or modalities.{modality}.prob=0)")
        if modality == "image":
            return sources.ImageFolder(root, size=d.image_size, captions=d.image_captions)
        if modality == "video":
            return sources.VideoFolder(root, frames=d.video_frames, stride=d.video_stride, size=d.video_size)
        return sources.AudioFolder(root, sample_rate=d.sample_rate, seconds=d.audio_seconds)
    if d.name == "tfds":
        if modality != "image":
            raise ValueError(f"data=tfds provides images only; set modalities.{modality}.prob=0")
        return sources.TFDSImages(d.dataset_dir, split=d.split, image_key=d.image_key, caption_key=d.caption_key,
                                  size=d.image_size)
    raise ValueError(f"unknown data source {d.name!r}; use data=procedural, data=folders or data=tfds")


def build_streams(cfg, frame_codec, audio_codec) -> list:
    """The pretraining `ModalityStream`s with probability > 0, each with its dataset and codec."""
    from worldmodel.pretrain import ModalityStream

    codecs = {"image": frame_codec, "video": frame_codec, "audio": audio_codec}
    streams = []
    for modality, mix in cfg.modalities.items():
        if modality not in codecs:
            raise ValueError(f"unknown pretraining modality {modality!r}; use image, video or audio")
        if float(mix.prob) > 0:
            dataset = build_dataset(cfg.data, modality)
            streams.append(ModalityStream(modality, dataset, codecs[modality], int(mix.batch_size), float(mix.prob)))
    return streams


@dataclass
class RT1Data:
    """Fine-tuning data built from the `data` group: the resolved dataset directory, its action (and state)
    statistics, the window geometry, and loaders: ``make_loader(pass, rank, world_size)`` for one training pass
    (shuffled by (seed, pass) only, so a resumed run replays it) and ``eval_batches()`` for the held-out split."""

    cfg: DictConfig  # the `data` node
    data_dir: Path
    normalizer: object  # ActionNormalizer (1st/99th percentiles of the train split)
    state_normalizer: object | None  # StateNormalizer when data.state, else None
    geometry: object  # WindowLayout (context, future, stride, horizon)
    seed: int

    def windows(self, split: str, rank: int = 0, world_size: int = 1, seed: int = 0):
        from worldmodel.data.rt1_reader import RT1Windows

        d, g = self.cfg, self.geometry
        return RT1Windows(self.data_dir, split=split, normalizer=self.normalizer, height=int(d.height),
                          width=int(d.width), context_frames=g.context_frames, future_frames=g.future_frames,
                          frame_stride=g.frame_stride, horizon=g.horizon, eval_fraction=float(d.eval_fraction),
                          rank=rank, world_size=world_size, seed=seed,
                          shuffle_buffer=int(d.shuffle_buffer) if split == "train" else 0,
                          num_parallel_calls=int(d.num_parallel_calls), state=self.state_normalizer is not None,
                          state_normalizer=self.state_normalizer)

    def make_loader(self, pass_index: int, rank: int, world_size: int):
        from worldmodel.data.rt1_reader import collate_rt1

        dataset = self.windows("train", rank, world_size, seed=self.seed * 100_003 + pass_index)
        return torch.utils.data.DataLoader(dataset, batch_size=int(self.cfg.batch_size), collate_fn=collate_rt1,
                                           num_workers=int(self.cfg.workers), drop_last=True)

    def eval_batches(self):
        from worldmodel.data.rt1_reader import collate_rt1

        return torch.utils.data.DataLoader(self.windows("eval"), batch_size=int(self.cfg.batch_size),
                                           collate_fn=collate_rt1)


def build_rt1_data(d, seed: int) -> RT1Data:
    """The `data` group of a fine-tuning config -> RT1Data: ``data.rt1_dir`` (a local RLDS version dir) or the
    embedded sample, with statistics computed once and cached beside the data."""
    from worldmodel.action_modes import WindowLayout
    from worldmodel.actions import load_or_compute_stats
    from worldmodel.data.rt1_synthetic import ensure_embedded_sample
    from worldmodel.state import load_or_compute_state_stats

    data_dir = d.rt1_dir or ensure_embedded_sample(num_episodes=int(d.synthetic_episodes), steps=int(d.synthetic_steps),
                                                  blocks=int(d.get("synthetic_blocks", 3)))
    normalizer = load_or_compute_stats(data_dir, eval_fraction=float(d.eval_fraction))
    state_normalizer = (load_or_compute_state_stats(data_dir, float(d.eval_fraction)) if bool(d.get("state", False))
                        else None)
    geometry = WindowLayout(int(d.context_frames), int(d.future_frames), int(d.frame_stride), int(d.horizon))
    return RT1Data(d, Path(data_dir), normalizer, state_normalizer, geometry, int(seed))
