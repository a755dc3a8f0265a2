"""Structured configs: the one source of truth for every Hydra config's keys, types, defaults and comments.

The YAML files in configs/ list only what they change; each key, its type, default and meaning live here
(or in the dataclass this module derives a group from: ``TrainerConfig`` for ``trainer``,
``TimestepDistribution`` for ``objective.timesteps``). Hydra's ConfigStore holds the schemas: ``pretrain_schema``,
``finetune_schema`` and ``probe_schema`` head the primary configs' defaults lists, and ``data/base_<source>``
the pretraining data sources. Hydra checks types and key names when it composes; ``validate`` then checks the
ranges and allowed values declared with ``spec`` and the source dataclasses' own checks, with errors that name
the key and what it accepts. Import this module before composing (``compose`` does; the scripts do).
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from worldmodel.sizes import MODEL_SIZES
from worldmodel.timesteps import TimestepDistribution
from worldmodel.trainer import TrainerConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def spec(default=MISSING, *, factory=None, ge=None, gt=None, le=None, lt=None, choices=None):
    """A dataclass field with a default and the range / allowed values ``validate`` enforces."""
    metadata = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices).items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def group_of(source, name: str, exclude: tuple[str, ...] = (), checks: dict | None = None):
    """A mutable schema dataclass with ``source``'s fields (types, defaults) minus ``exclude``; ``checks`` adds
    ``spec`` metadata per field. The source dataclass stays the one place its fields are defined and commented."""
    hints = typing.get_type_hints(source)
    fields = []
    for f in dataclasses.fields(source):
        if f.name in exclude:
            continue
        default = {"default": f.default} if f.default is not dataclasses.MISSING else {
            "default_factory": f.default_factory}
        fields.append((f.name, hints[f.name],
                       field(**default, metadata=(checks or {}).get(f.name, {}))))
    schema = dataclasses.make_dataclass(name, fields)
    schema.__module__ = __name__
    return schema


# ---------------------------------------------------------------------------------------- shared groups

# `trainer`: TrainerConfig's fields (worldmodel/trainer_config.py, commented there) without the three the run fills in.
# Besides these ranges, validate() runs TrainerConfig's own checks (max_steps >= 1, precision, ...).
TrainerGroup = group_of(TrainerConfig, "TrainerGroup", exclude=("output_dir", "seed", "device"),
                        checks={"lr": {"gt": 0.0}, "min_lr_ratio": {"ge": 0.0, "le": 1.0}, "eps": {"gt": 0.0},
                                "weight_decay": {"ge": 0.0}, "grad_clip": {"ge": 0.0},
                                "ema_decay": {"ge": 0.0, "le": 1.0}})
# `objective.timesteps`: TimestepDistribution's fields (worldmodel/timesteps.py) as a mutable node; validate() runs
# its own checks (kind, std > 0, shift > 0).
TimestepsGroup = group_of(TimestepDistribution, "TimestepsGroup")
# the source dataclass whose constructor checks a group: (source, values the run adds)
SOURCE_CHECKS = {TrainerGroup: (TrainerConfig, {"output_dir": ".", "seed": 0, "device": "cpu"}),
                 TimestepsGroup: (TimestepDistribution, {})}


@dataclass
class ModelGroup:
    """configs/model: the backbone size and per-field overrides of its registry entry."""

    size: str = spec("tiny", choices=tuple(MODEL_SIZES))  # a key of worldmodel.sizes.MODEL_SIZES
    overrides: dict[str, Any] = spec(factory=dict)  # per-field overrides, e.g. {hidden: 128}; {} keeps the size


@dataclass
class ObjectiveGroup:
    """configs/objective: Self-Flow (dual timesteps + EMA teacher + representation loss) or plain flow matching."""

    name: str = spec("selfflow", choices=("selfflow", "flow_matching"))  # the objective (the paper's comparison)
    # fraction of tokens taking the second time s instead of t, per modality (paper: 0.25 / 0.1 / 0.5)
    mask_ratio: dict[str, float] = spec(factory=lambda: {"image": 0.25, "video": 0.1, "audio": 0.5, "action": 0.25})
    gamma: float = spec(0.8, ge=0.0)  # weight of the representation loss: loss = L_flow + gamma * L_rep
    student_block: int | None = spec(None, ge=0)  # student block l (0-based); null = about 0.3 of the depth
    teacher_block: int | None = spec(None, ge=0)  # teacher block k (0-based); null = about 0.7 of the depth
    timesteps: TimestepsGroup = spec(factory=TimestepsGroup)  # p(t): uniform | logit_normal, then a time shift
    # extra time shift per modality on top of `timesteps` (e.g. {action: 7.4}); {} = none
    modality_shift: dict[str, float] = spec(factory=dict)


@dataclass
class CodecGroup:
    """configs/codec: the codecs turning frames and audio into tokens (worldmodel/codecs)."""

    # image / video codec: patch (pixel patches) | conv_ae (a trained ConvAutoencoder dir) | diffusers (a VAE dir)
    frames: str = spec("patch", choices=("patch", "conv_ae", "diffusers"))
    patch: int = spec(4, ge=1)  # pixel patch size of the patch codec (token dim = patch * patch * 3)
    frames_path: str | None = None  # folder of the trained frame autoencoder / VAE (conv_ae, diffusers only)
    audio: str = spec("patch", choices=("patch", "audio_ae"))  # audio codec: patch (raw sample frames) | audio_ae
    audio_frame: int = spec(64, ge=1)  # samples per audio token of the audio patch codec
    audio_path: str | None = None  # folder of a trained audio autoencoder (audio_ae only)


@dataclass
class TextGroup:
    """configs/text: the text encoder conditioning the backbone (worldmodel/text.py)."""

    # byte: a small trainable byte-level encoder (no download) | sentence: a frozen encoder in `path`
    encoder: str = spec("byte", choices=("byte", "sentence"))
    dim: int = spec(64, ge=1)  # width of the text features (the model's text_dim follows it)
    layers: int = spec(1, ge=0)  # transformer layers of the byte encoder
    max_len: int = spec(48, ge=1)  # longest caption / instruction kept, in bytes or tokens
    path: str | None = None  # local folder of a pretrained sentence encoder (encoder=sentence only)
    # fraction of captions dropped in training, so classifier-free guidance has an unconditional model
    caption_dropout: float = spec(0.1, ge=0.0, le=1.0)


# ------------------------------------------------------------------------------------------ pretraining

@dataclass
class ModalityMix:
    """One modality's share of the pretraining micro-steps and its batch size."""

    prob: float = spec(0.0, ge=0.0, le=1.0)  # probability of a micro-step holding this modality; 0 = skip it
    batch_size: int = spec(1, ge=1)  # samples per micro-step (per rank)


@dataclass
class Modalities:
    """Each optimizer micro-step holds ONE modality, drawn with these probabilities (paper: 57/30/13 %)."""

    image: ModalityMix = spec(factory=lambda: ModalityMix(0.57, 16))  # images
    video: ModalityMix = spec(factory=lambda: ModalityMix(0.30, 4))  # video clips
    audio: ModalityMix = spec(factory=lambda: ModalityMix(0.13, 8))  # audio clips


@dataclass
class Guidance:
    """Classifier-free guidance scale per modality (paper, qualitative samples: 3.5 image, 5 video and audio)."""

    image: float = spec(3.5, ge=0.0)  # image guidance
    video: float = spec(5.0, ge=0.0)  # video guidance
    audio: float = spec(5.0, ge=0.0)  # audio guidance


@dataclass
class Sampling:
    """Samples written at the end of pretraining (and every trainer.eval_every steps)."""

    steps: int = spec(50, ge=1)  # Euler steps (paper: 50 outside ImageNet)
    shift: float = spec(1.0, gt=0.0)  # time shift of the sampling schedule (1 = none)
    method: str = spec("euler", choices=("euler", "euler_maruyama"))  # ODE (euler) or SDE (euler_maruyama)
    guidance: Guidance = spec(factory=Guidance)  # classifier-free guidance per modality
    num_samples: int = spec(16, ge=1)  # samples per modality (image grid size; a quarter of it for video, audio)
    use_ema: bool = True  # sample with the EMA weights (recommended)


@dataclass
class PretrainConfig:
    """configs/pretrain.yaml: multi-modal Self-Flow pretraining (scripts/pretrain.py)."""

    seed: int = 0  # seed of the model init, the data order and the noise
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))  # auto picks CUDA when available, else CPU
    model: ModelGroup = spec(factory=ModelGroup)  # backbone size (configs/model)
    data: Any = MISSING  # data sources (configs/data): procedural | folders | tfds
    objective: ObjectiveGroup = spec(factory=ObjectiveGroup)  # training objective (configs/objective)
    trainer: TrainerGroup = spec(factory=TrainerGroup)  # optimisation and checkpointing (configs/trainer)
    modalities: Modalities = spec(factory=Modalities)  # the modality mixture of the micro-steps
    codec: CodecGroup = spec(factory=CodecGroup)  # codecs (configs/codec)
    text: TextGroup = spec(factory=TextGroup)  # text conditioning (configs/text)
    sampling: Sampling = spec(factory=Sampling)  # samples written by the run


@dataclass
class ProceduralData:
    """configs/data/procedural: deterministic procedural images, videos and audio (no download)."""

    name: str = spec("procedural", choices=("procedural",))  # the data source
    seed: int = 0  # seed of the generator (the same seed gives the same dataset)
    length: int = spec(100000, ge=1)  # samples per epoch of each dataset (indices wrap)
    image_size: int = spec(32, ge=4)  # image side in pixels (square)
    video_size: int = spec(16, ge=4)  # side of video frames in pixels
    video_frames: int = spec(4, ge=1)  # frames per video clip
    sample_rate: int = spec(8000, ge=1)  # audio sample rate in Hz
    audio_seconds: float = spec(0.5, gt=0.0)  # audio clip length in seconds


@dataclass
class FoldersData:
    """configs/data/folders: your own media; a null root skips that modality (set its modalities.<name>.prob 0)."""

    name: str = spec("folders", choices=("folders",))  # the data source
    seed: int = 0  # seed of the sampling order
    image_root: str | None = None  # folder of png/jpg images (recursive)
    image_captions: str | None = spec("sidecar", choices=("sidecar", "jsonl", None))  # .txt beside | captions.jsonl
    image_size: int = spec(32, ge=4)  # image side after resize and centre crop
    video_root: str | None = None  # folder of videos (mp4, ...), read with imageio / pyav
    video_size: int = spec(16, ge=4)  # side of video frames after resize and centre crop
    video_frames: int = spec(4, ge=1)  # frames per clip
    video_stride: int = spec(2, ge=1)  # take every video_stride-th frame
    audio_root: str | None = None  # folder of wav files
    sample_rate: int = spec(8000, ge=1)  # target sample rate (files are resampled)
    audio_seconds: float = spec(0.5, gt=0.0)  # clip length in seconds


@dataclass
class TFDSData:
    """configs/data/tfds: images of a tensorflow-datasets dataset prepared in a local directory (no download)."""

    name: str = spec("tfds", choices=("tfds",))  # the data source
    seed: int = 0  # seed of the sampling order
    dataset_dir: str = MISSING  # the prepared version directory, e.g. ~/tensorflow_datasets/cifar10/3.0.2
    split: str = "train"  # split to read
    image_key: str = "image"  # feature holding the image
    caption_key: str | None = None  # feature holding a caption or class label (null: no caption)
    image_size: int = spec(32, ge=4)  # image side after resize and centre crop


# ------------------------------------------------------------------------------------------ fine-tuning

@dataclass
class RT1Data:
    """Windows of an RT-1-schema RLDS dataset (worldmodel/data/rt1_reader.py)."""

    rt1_dir: str | None = None  # local RLDS version directory (.../fractal20220817_data/0.1.0); null = embedded
    height: int = spec(32, ge=1)  # frame height fed to the model after resize / crop (RT-1 frames are 256x320)
    width: int = spec(40, ge=1)  # frame width
    context_frames: int = spec(2, ge=1)  # clean context frames up to the current step
    future_frames: int = spec(2, ge=0)  # future frames the model predicts (video, joint and dynamics modes)
    frame_stride: int = spec(1, ge=1)  # steps between consecutive frames (RT-1 runs at 3 Hz)
    horizon: int = spec(4, ge=1)  # action chunk length H (one action token per step)
    state: bool = False  # condition on proprioception (stats stored in the checkpoint); false = images + text
    eval_fraction: float = spec(0.1, ge=0.0, lt=1.0)  # fraction of episodes held out (split by episode)
    batch_size: int = spec(16, ge=1)  # windows per micro-batch (per rank)
    shuffle_buffer: int = spec(2000, ge=0)  # shuffle buffer (windows) of the tf.data pipeline
    num_parallel_calls: int = spec(2, ge=1)  # parallel decode calls in tf.data
    workers: int = spec(0, ge=0)  # torch DataLoader worker processes (0 = decode in the training process)
    synthetic_episodes: int = spec(800, ge=2)  # embedded sample size when rt1_dir is null
    synthetic_steps: int = spec(16, ge=2)  # steps per embedded episode
    synthetic_blocks: int = spec(1, ge=1, le=4)  # coloured blocks on the embedded sample's table (1-4)


@dataclass
class Modes:
    """Mixture of fine-tuning modes (one per micro-batch, worldmodel/action_modes.py)."""

    policy: float = spec(0.7, ge=0.0)  # actions noised given clean context frames: what the policy runs
    joint: float = spec(0.1, ge=0.0)  # future frames and actions noised together
    dynamics: float = spec(0.1, ge=0.0)  # forward dynamics: actions clean, future frames noised
    video: float = spec(0.1, ge=0.0)  # video prediction: actions absent, future frames noised


@dataclass
class OfflineEval:
    """Offline evaluation on held-out episodes (every trainer.eval_every steps, and at the end)."""

    sampling_steps: int = spec(10, ge=1)  # Euler steps when sampling action chunks (the policy's default)
    batches: int | None = spec(48, ge=1)  # held-out batches evaluated (null = the whole held-out split)
    video: bool = True  # write a GIF of predicted vs true future frames


@dataclass
class PolicyDefaults:
    """Defaults stored in the checkpoint for SelfFlowPolicy.from_pretrained (its keyword arguments override them)."""

    execute_steps: int | None = spec(None, ge=1)  # actions executed per chunk before re-planning; null = all


@dataclass
class FinetuneConfig:
    """configs/finetune_rt1.yaml: RT-1 video-action fine-tuning (scripts/finetune_rt1.py)."""

    seed: int = 0  # seed of the init, the data order, the mode draws and the noise
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))  # auto picks CUDA when available, else CPU
    init_from: str | None = None  # pretraining checkpoint dir to start from (its codec and text are used)
    model: ModelGroup = spec(factory=ModelGroup)  # backbone size (configs/model)
    objective: ObjectiveGroup = spec(factory=ObjectiveGroup)  # training objective (configs/objective)
    trainer: TrainerGroup = spec(factory=TrainerGroup)  # optimisation (configs/trainer)
    data: RT1Data = spec(factory=RT1Data)  # the RT-1-schema windows
    modes: Modes = spec(factory=Modes)  # mixture of training modes
    codec: CodecGroup = spec(factory=CodecGroup)  # codecs (configs/codec; ignored with init_from)
    text: TextGroup = spec(factory=TextGroup)  # text encoder (configs/text; ignored with init_from but dropout)
    eval: OfflineEval = spec(factory=OfflineEval)  # offline evaluation
    policy: PolicyDefaults = spec(factory=PolicyDefaults)  # defaults for the deployed policy


# ---------------------------------------------------------------------------------------------- probes

@dataclass
class ProbeConfig:
    """configs/probe.yaml: linear probes of pretrained checkpoints (scripts/probe.py)."""

    checkpoints: list[str] = spec(factory=list)  # pretraining run dirs (holding checkpoint/) or checkpoint dirs
    names: list[str] | None = None  # display names, one per checkpoint (null = the folder names)
    modalities: list[str] = spec(factory=lambda: ["image"])  # modalities to probe: image | video | audio
    num_samples: int = spec(1000, ge=2)  # samples per probe (split into train / held-out test)
    train_frac: float = spec(0.8, gt=0.0, lt=1.0)  # fraction of the samples the probes train on
    tau: float = spec(0.0, ge=0.0, le=1.0)  # flow time of the probed tokens: 0 = clean data
    text: str = spec("empty", choices=("empty", "caption", "none"))  # text stream fed with the probed tokens
    blocks: list[int] | None = None  # blocks to probe (null = every block)
    batch_size: int = spec(64, ge=1)  # samples per forward pass
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))  # auto picks CUDA when available, else CPU
    seed: int = 0  # seed of the sample subset, the noise and the train/test split
    threads: int | None = spec(None, ge=1)  # torch CPU threads (null = torch's default)


DATA_SCHEMAS = {"procedural": ProceduralData, "folders": FoldersData, "tfds": TFDSData}


def register() -> None:
    """Put the schemas into Hydra's ConfigStore (idempotent; done on import)."""
    store = ConfigStore.instance()
    store.store(name="pretrain_schema", node=PretrainConfig)
    store.store(name="finetune_schema", node=FinetuneConfig)
    store.store(name="probe_schema", node=ProbeConfig)
    for name, node in DATA_SCHEMAS.items():
        store.store(group="data", name=f"base_{name}", node=node)


register()


# ------------------------------------------------------------------------------------------ validation

def _allowed(meta: dict) -> str:
    if "choices" in meta:
        return f"one of {list(meta['choices'])}"
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return "a number " + " and ".join(f"{words[k]} {meta[k]}" for k in ("ge", "gt", "le", "lt") if k in meta)


def _ok(value, meta: dict) -> bool:
    if "choices" in meta:
        return value in meta["choices"]
    if value is None:  # an Optional number left unset
        return True
    return (("ge" not in meta or value >= meta["ge"]) and ("gt" not in meta or value > meta["gt"])
            and ("le" not in meta or value <= meta["le"]) and ("lt" not in meta or value < meta["lt"]))


def validate(cfg: DictConfig, prefix: str = "") -> DictConfig:
    """Check every structured node of a composed config: the ranges and allowed values declared with ``spec``
    and the source dataclasses' own checks. Raises ValueError naming the key and what it accepts; returns cfg."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return cfg
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if f.name not in cfg.keys():  # (`in cfg` is False for a ??? value)
            continue
        if OmegaConf.is_missing(cfg, f.name):
            raise ValueError(f"{key} is required here (it is ???): pass {key}=...")
        value = cfg[f.name]
        if isinstance(value, DictConfig):
            validate(value, f"{key}.")
        elif f.metadata and not _ok(value, f.metadata):
            raise ValueError(f"{key}={value!r} is not allowed: use {_allowed(f.metadata)} (e.g. {key}={f.default!r})")
    if schema in SOURCE_CHECKS:
        source, added = SOURCE_CHECKS[schema]
        try:
            source(**{**OmegaConf.to_container(cfg, resolve=True), **added})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{prefix.rstrip('.') or 'config'}: {err}") from err
    return cfg


def compose(name: str, overrides: list[str] | tuple[str, ...] = (), config_dir: str | Path = CONFIG_DIR) -> DictConfig:
    """The config ``configs/<name>.yaml`` composed with ``overrides`` (key=value strings) and validated, as the
    scripts load it (without the hydra node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name=name, overrides=list(overrides))
        except MissingConfigException:  # no such config file: the caller names the ones there are
            raise
        except ConfigCompositionException as err:  # a bad key or value: name it with the reason Hydra found
            cause = f": {' '.join(str(err.__cause__).split())}" if err.__cause__ is not None else ""
            raise ValueError(f"{err}{cause}") from err
    return validate(cfg)
