"""Text encoders for caption conditioning, caption dropout for classifier-free guidance, and a registry.

Every encoder has ``feature_dim`` and ``encode(captions, device) -> (features (B, L, Dt), mask (B, L) bool)``
with a fixed L (static shapes for compiled / graph-captured models). The unconditional text is the backbone's
null token: rows of dropped or blank captions (``blank_captions``) are flagged in ``TokenSequence.text_drop``
(their encoded features are masked out), so CFG's text=None is the input that was trained. The default
``ByteTextEncoder`` needs no download and is trained with the model;
``FrozenSentenceEncoder`` loads a pretrained transformer from a LOCAL folder (extra: ``transformers``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

TEXT_ENCODERS = ("byte", "sentence")


@runtime_checkable
class TextEncoder(Protocol):
    """What the backbone's text stream consumes."""

    feature_dim: int

    def encode(self, captions: list[str | None], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(features (B, L, feature_dim) float, mask (B, L) bool with True = real token)."""
        ...


class ByteTextEncoder(nn.Module):
    """UTF-8 bytes -> embedding + learned positions -> small pre-norm transformer encoder (trainable).

    Sequences are ``[BOS] + bytes[: max_len - 1]`` padded to ``max_len``; BOS is always a real token, so an
    empty caption gives one valid token (never an all-masked row). Padded positions have zero features.
    """

    BOS, PAD, VOCAB = 256, 257, 258

    def __init__(self, dim: int = 256, max_len: int = 64, layers: int = 2, heads: int | None = None):
        super().__init__()
        heads = heads or max(1, dim // 64)
        if dim % heads:
            raise ValueError(f"ByteTextEncoder dim {dim} is not divisible by heads {heads}; pick dim = k * heads")
        if max_len < 2:
            raise ValueError(f"ByteTextEncoder max_len must be >= 2 (BOS + one byte), got {max_len}")
        self.feature_dim, self.max_len = int(dim), int(max_len)
        self.embed = nn.Embedding(self.VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers > 0 else None
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    @property
    def config(self) -> dict:
        return {"dim": self.feature_dim, "max_len": self.max_len,
                "layers": len(self.blocks.layers) if self.blocks is not None else 0}

    def tokenize(self, captions: list[str | None]) -> tuple[Tensor, Tensor]:
        """(ids (B, L) long, mask (B, L) bool) on the CPU."""
        ids = torch.full((len(captions), self.max_len), self.PAD, dtype=torch.long)
        ids[:, 0] = self.BOS
        for i, caption in enumerate(captions):
            data = (caption or "").encode("utf-8")[: self.max_len - 1]
            if data:
                ids[i, 1: 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        return ids, ids != self.PAD

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, L, D)
        if self.blocks is not None:
            x = self.blocks(x, src_key_padding_mask=~mask)
        return self.norm(x) * mask[..., None]

    def encode(self, captions: list[str | None], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Captions -> (features (B, max_len, dim), mask (B, max_len)), on ``device`` (default: the module's)."""
        own = self.pos.device
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(own), mask.to(own)
        features = self(ids, mask)
        device = own if device is None else torch.device(device)
        return features.to(device), mask.to(device)


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError("FrozenSentenceEncoder needs the optional `transformers` package: "
                          "pip install -e .[text] (or pip install transformers)") from err
    return transformers


class FrozenSentenceEncoder(nn.Module):
    """A frozen pretrained transformer encoder (token features, not pooled) loaded from a local folder.

    Works with folders written by ``AutoModel.save_pretrained`` + ``AutoTokenizer.save_pretrained`` and with
    sentence-transformers folders (the transformer at the root or in ``0_Transformer/``). Nothing is
    downloaded. Its weights never train (``requires_grad`` False, always in eval mode).
    """

    def __init__(self, model: nn.Module, tokenizer, max_len: int = 64):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.max_len = tokenizer, int(max_len)
        self.feature_dim = int(model.config.hidden_size)

    @classmethod
    def from_folder(cls, path: str | Path, max_len: int = 64) -> FrozenSentenceEncoder:
        path = Path(path).expanduser()
        if not (path / "config.json").is_file() and (path / "0_Transformer" / "config.json").is_file():
            path = path / "0_Transformer"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no transformer model (no config.json); save one there with "
                                    "model.save_pretrained(path) and tokenizer.save_pretrained(path)")
        transformers = _transformers()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        return cls(model, tokenizer, max_len=max_len)

    def train(self, mode: bool = True) -> FrozenSentenceEncoder:
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off
        return self

    @torch.no_grad()
    def encode(self, captions: list[str | None], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Captions -> (last hidden states (B, max_len, hidden), attention mask (B, max_len) bool)."""
        own = next(self.model.parameters()).device
        batch = self.tokenizer([c or "" for c in captions], padding="max_length", truncation=True,
                               max_length=self.max_len, return_tensors="pt")
        batch = {k: v.to(own) for k, v in batch.items()}
        mask = batch["attention_mask"].bool()
        features = self.model(**batch).last_hidden_state.float() * mask[..., None]
        device = own if device is None else torch.device(device)
        return features.to(device), mask.to(device)


def drop_captions(
    captions: list[str | None], rate: float, generator: torch.Generator | None = None
) -> list[str | None]:
    """Replace each caption by None (unconditional) with probability ``rate``, for classifier-free guidance."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"caption dropout rate must be in [0, 1], got {rate}")
    keep = torch.rand(len(captions), generator=generator) >= rate
    return [c if k else None for c, k in zip(captions, keep.tolist())]


def blank_captions(captions: list[str | None]) -> Tensor:
    """(B,) bool, True for None / empty / whitespace-only captions: rows that take the model's null text."""
    return torch.tensor([not (c or "").strip() for c in captions], dtype=torch.bool)


def build_text_encoder(name: str = "byte", dim: int | None = 256, max_len: int = 64, path: str | None = None,
                       layers: int = 2, heads: int | None = None) -> nn.Module:
    """Registry: "byte" -> ByteTextEncoder(dim, max_len, layers, heads); "sentence" -> FrozenSentenceEncoder
    from ``path`` (if ``dim`` is given it must equal the model's hidden size)."""
    if name == "byte":
        return ByteTextEncoder(dim=dim or 256, max_len=max_len, layers=layers, heads=heads)
    if name == "sentence":
        if not path:
            raise ValueError("text encoder 'sentence' needs `path`: a local folder with a saved transformer model "
                             "and tokenizer (text.path=/path/to/model)")
        encoder = FrozenSentenceEncoder.from_folder(path, max_len=max_len)
        if dim is not None and dim != encoder.feature_dim:
            raise ValueError(f"the sentence encoder in {path} gives {encoder.feature_dim}-d features but dim={dim}; "
                             f"set text.dim={encoder.feature_dim} (and the model's text_dim to match)")
        return encoder
    raise ValueError(f"unknown text encoder {name!r}; choose one of {', '.join(TEXT_ENCODERS)}")
