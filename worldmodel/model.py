"""The multi-modal MMDiT backbone (FLUX.2 style) in which every token carries its own flow time.

``WorldModel`` is only the velocity field v(x, tau, text): noising, losses and samplers live elsewhere.
Per-modality input projections Linear(token_dim[m], D) and output heads (adaLN + Linear(D, token_dim[m]));
all blocks are shared across modalities. Blocks are numbered 0..depth-1 over the double-stream blocks
then the single-stream blocks; ``hidden[i]`` is the media-token output of block i (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from worldmodel.layers import (
    DoubleStreamBlock,
    FinalLayer,
    Modulation,
    SingleStreamBlock,
    TimeCond,
    TimeEmbedder,
    rope_frequencies,
)
from worldmodel.tokens import MODALITIES, TokenSequence, segment_slices

DEFAULT_TOKEN_DIM = {"image": 48, "video": 48, "audio": 64, "action": 7, "state": 8}


@dataclass
class ModelConfig:
    """Every field of the backbone; ``WorldModel.config`` is ``asdict`` of this (JSON-serialisable)."""

    size: str = "custom"  # registry name this config came from (worldmodel.sizes.MODEL_SIZES), or "custom"
    hidden: int = 96  # model width D
    heads: int = 4  # attention heads; head dim = hidden / heads
    depth_double: int = 2  # double-stream blocks (separate text / media weights)
    depth_single: int = 2  # single-stream blocks (shared weights over [text; media])
    mlp_ratio: float = 4.0  # MLP width = mlp_ratio * hidden
    rope_axes: tuple[int, ...] = (8, 8, 8)  # RoPE dims per (t, h, w) axis; even, summing to the head dim
    rope_theta: float = 10000.0  # RoPE base period
    text_dim: int = 256  # channels of the incoming text-encoder features
    token_dim: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_TOKEN_DIM))  # channels per modality
    time_freq_dim: int = 256  # sinusoidal time-embedding width before the time MLP
    init_std: float = 0.02  # std of the small-normal init of modulation, output and embedding weights

    def __post_init__(self) -> None:
        self.rope_axes = tuple(int(a) for a in self.rope_axes)
        unknown = set(self.token_dim) - set(MODALITIES)
        if unknown:
            raise ValueError(f"token_dim names unknown modalities {sorted(unknown)}; valid: {', '.join(MODALITIES)}")
        self.token_dim = {**DEFAULT_TOKEN_DIM, **{k: int(v) for k, v in self.token_dim.items()}}
        for name in ("hidden", "heads", "text_dim", "time_freq_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model config {name} must be a positive integer, got {getattr(self, name)}")
        if min(self.token_dim.values()) <= 0:
            raise ValueError(f"token_dim values must be positive, got {self.token_dim}")
        if self.depth_double < 0 or self.depth_single < 0 or self.depth_double + self.depth_single == 0:
            raise ValueError("depth_double and depth_single must be >= 0 with at least one block in total")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}; pick heads dividing it")
        head_dim = self.hidden // self.heads
        if len(self.rope_axes) != 3 or sum(self.rope_axes) != head_dim or any(a % 2 for a in self.rope_axes):
            raise ValueError(
                f"rope_axes {self.rope_axes} must be 3 even ints summing to the head dim {head_dim} "
                f"(hidden {self.hidden} / heads {self.heads})"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rope_axes"] = list(self.rope_axes)
        return out

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


class ModelOutput(NamedTuple):
    """velocity (B, N, C) zero-padded like ``seq.x`` (None when stopped early); hidden {block: (B, N, D)}."""

    velocity: Tensor | None
    hidden: dict[int, Tensor]


class TextContext(NamedTuple):
    """What a forward pass computes from the text and the token positions alone: unchanged while only the
    values and times change (the steps of one sampled chunk), so a sampler computes it once per chunk."""

    txt: Tensor  # (B, L, D) text stream entering the first block (the null token when there is no text)
    mask: Tensor | None  # (B, 1, 1, L+N) bool attention-key mask (padded text masked out), or None
    rope: tuple[Tensor, Tensor]  # cos, sin (L+N, head_dim)


class WorldModel(nn.Module):
    """MMDiT velocity field over a packed multi-modal ``TokenSequence`` with per-token flow time."""

    def __init__(self, config: ModelConfig | dict):
        super().__init__()
        cfg = config if isinstance(config, ModelConfig) else ModelConfig(**config)
        self.cfg = cfg
        d = cfg.hidden
        self.inputs = nn.ModuleDict({m: nn.Linear(cfg.token_dim[m], d) for m in MODALITIES})
        self.outputs = nn.ModuleDict({m: FinalLayer(d, cfg.token_dim[m]) for m in MODALITIES})
        self.text_in = nn.Linear(cfg.text_dim, d)
        self.null_text = nn.Parameter(torch.zeros(1, 1, d))  # the "unconditional" text token (CFG)
        self.time_embed = TimeEmbedder(d, cfg.time_freq_dim)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth_double)]
        )
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth_single)]
        )
        self.reset_parameters()

    # ------------------------------------------------------------------------------------ metadata
    @property
    def config(self) -> dict:
        """Plain JSON-serialisable dict; ``build_model(**config)`` rebuilds this architecture."""
        return self.cfg.to_dict()

    @property
    def num_blocks(self) -> int:
        return self.cfg.depth_double + self.cfg.depth_single

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden

    @property
    def token_dim(self) -> dict[str, int]:
        return dict(self.cfg.token_dim)

    def reset_parameters(self) -> None:
        """DiT-like init, but small-normal (not zero) modulation and output weights so every grad is nonzero."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, Modulation):
                nn.init.normal_(module.lin.weight, std=std)
        for head in self.outputs.values():
            nn.init.normal_(head.linear.weight, std=std)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.null_text, std=std)

    # ------------------------------------------------------------------------------------- forward
    def _check(self, seq: TokenSequence, return_hidden: Sequence[int], stop_after: int | None) -> set[int]:
        depth = self.num_blocks
        channels = seq.x.shape[-1]
        for modality, _ in seq.layout:
            if channels < self.cfg.token_dim[modality]:
                raise ValueError(
                    f"TokenSequence.x has {channels} channels but modality {modality!r} needs "
                    f"token_dim {self.cfg.token_dim[modality]}; encode it with the matching codec or set token_dim"
                )
        if seq.text is not None:
            if seq.text.shape[-1] != self.cfg.text_dim:
                raise ValueError(
                    f"text features have {seq.text.shape[-1]} channels, the model expects text_dim "
                    f"{self.cfg.text_dim}; use the matching text encoder or build the model with text_dim set"
                )
            if seq.text_mask is not None and tuple(seq.text_mask.shape) != tuple(seq.text.shape[:2]):
                raise ValueError(f"text_mask must be {tuple(seq.text.shape[:2])}, got {tuple(seq.text_mask.shape)}")
        if seq.time_levels is not None:
            b, n = seq.tau.shape
            if seq.time_levels.dim() != 2 or seq.time_levels.shape[0] != b or tuple(seq.time_index.shape) != (b, n):
                raise ValueError(
                    f"time_levels must be ({b}, K) and time_index ({b}, {n}); got "
                    f"{tuple(seq.time_levels.shape)} and {tuple(seq.time_index.shape)}"
                )
        if stop_after is not None and not 0 <= stop_after < depth:
            raise ValueError(f"stop_after={stop_after} is outside the blocks 0..{depth - 1}")
        wanted = {int(i) for i in return_hidden}
        last = depth - 1 if stop_after is None else stop_after
        bad = sorted(i for i in wanted if not 0 <= i <= last)
        if bad:
            raise ValueError(f"return_hidden {bad} lies outside the blocks run (0..{last}); ask for blocks <= {last}")
        return wanted

    def _time_conditions(self, seq: TokenSequence, length: int) -> tuple[TimeCond, TimeCond, TimeCond]:
        """(text cond, media cond, joint [text; media] cond); text tokens use the embedding of tau = 0."""
        b, n = seq.tau.shape
        if seq.time_levels is not None:  # modulation once per level, gathered to tokens
            zeros = torch.zeros(b, 1, device=seq.tau.device, dtype=seq.time_levels.dtype)
            emb = self.time_embed(torch.cat([zeros, seq.time_levels], dim=1))  # (B, K+1, D); level 0 = tau 0
            index = seq.time_index.long() + 1  # (B, N)
            text_index = torch.zeros(b, length, device=index.device, dtype=torch.long)  # (B, L)
            joint = TimeCond(emb, torch.cat([text_index, index], dim=1))  # (B, L+N) -> levels
            return TimeCond(emb[:, :1]), TimeCond(emb, index), joint
        zeros = torch.zeros(b, 1, device=seq.tau.device, dtype=seq.tau.dtype)
        emb = self.time_embed(torch.cat([zeros, seq.tau], dim=1))  # (B, 1+N, D)
        text_emb, media_emb = emb[:, :1], emb[:, 1:]  # (B, 1, D), (B, N, D)
        joint = torch.cat([text_emb.expand(b, length, -1), media_emb], dim=1)  # (B, L+N, D)
        return TimeCond(text_emb), TimeCond(media_emb), TimeCond(joint)

    def _text_stream(self, seq: TokenSequence, b: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """Text tokens and key mask: the null token when text is None; with ``seq.text_drop``, the null token
        is prepended and each row attends either to it alone (dropped) or to its real text alone."""
        null = self.null_text.expand(b, -1, -1).to(dtype)  # (B, 1, D)
        if seq.text is None:
            return null, None
        txt = self.text_in(seq.text.to(self.text_in.weight.dtype))  # (B, L, D)
        if seq.text_drop is None:
            return txt, seq.text_mask
        drop = seq.text_drop.to(device=txt.device, dtype=torch.bool)[:, None]  # (B, 1)
        real = seq.text_mask.bool() if seq.text_mask is not None else torch.ones_like(txt[..., 0], dtype=torch.bool)
        key_mask = torch.cat([drop, real & ~drop], dim=1)  # (B, 1+L)
        return torch.cat([null.to(txt.dtype), txt], dim=1), key_mask  # (B, 1+L, D)

    def prepare_context(self, seq: TokenSequence, dtype: torch.dtype | None = None) -> TextContext:
        """Text stream, attention mask and RoPE of ``seq`` (they depend on text, text_drop and positions only)."""
        b, n = seq.tau.shape
        txt, key_mask = self._text_stream(seq, b, dtype or self.text_in.weight.dtype)  # (B, L, D), (B, L) or None
        length = txt.shape[1]
        mask = None
        if key_mask is not None:  # padded text tokens are masked out of the attention keys
            media_keys = torch.ones(b, n, dtype=torch.bool, device=seq.x.device)
            mask = torch.cat([key_mask.bool(), media_keys], dim=1)[:, None, None, :]  # (B, 1, 1, L+N)
        text_pos = torch.zeros(length, 3, device=seq.pos.device, dtype=seq.pos.dtype)
        rope = rope_frequencies(torch.cat([text_pos, seq.pos], dim=0), self.cfg.rope_axes, self.cfg.rope_theta)
        return TextContext(txt, mask, rope)

    def forward(
        self, seq: TokenSequence, return_hidden: Sequence[int] = (), stop_after: int | None = None,
        context: TextContext | None = None,
    ) -> ModelOutput:
        """Velocity for every token of ``seq`` and the media hidden states of the blocks in ``return_hidden``.

        context: ``prepare_context(seq)`` computed earlier for a sequence with the same text and positions.
        """
        wanted = self._check(seq, return_hidden, stop_after)
        x = seq.x  # (B, N, C)
        b, n, channels = x.shape
        segments = segment_slices(seq.layout)
        dims = self.cfg.token_dim
        wdtype = self.text_in.weight.dtype
        parts = [self.inputs[m](x[:, sl, : dims[m]].to(wdtype)) for m, sl in segments]  # [(B, n_m, D)]
        img = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, N, D)

        txt, mask, rope = context if context is not None else self.prepare_context(seq, img.dtype)
        length = txt.shape[1]
        txt_cond, img_cond, joint_cond = self._time_conditions(seq, length)

        hidden: dict[int, Tensor] = {}
        index = 0
        for block in self.double_blocks:
            txt, img = block(txt, img, txt_cond, img_cond, rope, mask)  # (B, L, D), (B, N, D)
            if index in wanted:
                hidden[index] = img
            if index == stop_after:
                return ModelOutput(None, hidden)
            index += 1
        if len(self.single_blocks):
            joint = torch.cat([txt, img], dim=1)  # (B, L+N, D)
            for block in self.single_blocks:
                joint = block(joint, joint_cond, rope, mask)
                if index in wanted:
                    hidden[index] = joint[:, length:]
                if index == stop_after:
                    return ModelOutput(None, hidden)
                index += 1
            img = joint[:, length:]  # (B, N, D)

        outs = []
        for m, sl in segments:
            out = self.outputs[m](img[:, sl], img_cond.slice(sl))  # (B, n_m, token_dim[m])
            outs.append(nn.functional.pad(out, (0, channels - dims[m])))  # (B, n_m, C)
        velocity = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (B, N, C)
        return ModelOutput(velocity, hidden)
