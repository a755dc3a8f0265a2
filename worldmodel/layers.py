"""Building blocks of the MMDiT backbone: norms, 3-D RoPE, time embedding, per-token adaLN, stream blocks.

Every token carries its own flow time, so adaLN modulation is per token. ``TimeCond`` hides whether
the modulation is computed per token or once per distinct time level and gathered to the tokens
(docs/ARCHITECTURE.md "Performance notes"); both give the same numbers. Nothing here syncs with the host, so the
blocks can be compiled and captured in CUDA graphs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters (adaLN supplies shift and scale)."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


# ----------------------------------------------------------------------------------------- RoPE
def rope_frequencies(pos: Tensor, axes: tuple[int, ...], theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (S, head_dim) for positions ``pos`` (S, len(axes)); each axis owns ``axes[i]`` dims.

    Rotate-half layout: frequency j pairs dims j and j + head_dim / 2.
    """
    angles = []
    for i, dim in enumerate(axes):
        inv = theta ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)  # (dim/2,)
        angles.append(pos[:, i : i + 1].float() * inv)  # (S, dim/2)
    ang = torch.cat(angles, dim=-1)  # (S, head_dim/2)
    ang = torch.cat([ang, ang], dim=-1)  # (S, head_dim)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, H, S, hd) by the angles behind cos/sin (S, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, H, S, hd)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
    """Joint attention. q, k, v (B, H, S, hd) already QK-normed; mask (B, 1, 1, S) bool or None -> (B, S, H*hd)."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, hd)
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d)


def split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, S, 3D) -> three (B, H, S, hd)."""
    b, s, _ = qkv.shape
    q, k, v = qkv.view(b, s, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


# ----------------------------------------------------------------------------------- time / adaLN
def timestep_embedding(tau: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of flow times ``tau`` (...,) -> (..., dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=tau.device, dtype=torch.float32) / half)
    args = tau.float()[..., None] * scale * freqs  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedder(nn.Module):
    """tau (...,) -> SiLU(MLP(sinusoid(tau))) (..., D): the input every modulation linear reads."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, tau: Tensor) -> Tensor:
        emb = timestep_embedding(tau, self.freq_dim).to(self.mlp[0].weight.dtype)
        return F.silu(self.mlp(emb))


class TimeCond:
    """Per-token conditioning, stored either per token or per time level.

    emb:   (B, K, D) SiLU'd time embeddings. With ``index`` None, K equals the token count (or 1, broadcast).
    index: (B, M) long or None; token m uses ``emb[:, index[:, m]]``.
    """

    def __init__(self, emb: Tensor, index: Tensor | None = None):
        self.emb, self.index = emb, index

    def project(self, linear: nn.Linear) -> Tensor:
        """linear(emb) gathered to tokens: (B, M, out) (or (B, 1, out) for a broadcast embedding)."""
        out = linear(self.emb)  # (B, K, out)
        if self.index is None:
            return out
        idx = self.index[..., None].expand(-1, -1, out.shape[-1])  # (B, M, out)
        return out.gather(1, idx)

    def slice(self, sl: slice) -> TimeCond:
        """Conditioning of the tokens in ``sl`` only."""
        if self.index is None:
            return TimeCond(self.emb if self.emb.shape[1] == 1 else self.emb[:, sl])
        return TimeCond(self.emb, self.index[:, sl])


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class Modulation(nn.Module):
    """Linear(D, n * D) of the time embedding, split into n chunks of (B, M, D)."""

    def __init__(self, hidden: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(hidden, n * hidden)

    def forward(self, cond: TimeCond) -> tuple[Tensor, ...]:
        return cond.project(self.lin).chunk(self.n, dim=-1)


def mlp(hidden: int, ratio: float) -> nn.Sequential:
    inner = int(hidden * ratio)
    return nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))


# ----------------------------------------------------------------------------------------- blocks
class StreamParams(nn.Module):
    """One stream's weights inside a double-stream block: 6-way modulation, qkv, QK norms, out, MLP (~18 D^2)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        head_dim = hidden // heads
        self.mod = Modulation(hidden, 6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = mlp(hidden, mlp_ratio)

    def pre_attention(self, x: Tensor, mod: tuple[Tensor, ...], heads: int) -> tuple[Tensor, Tensor, Tensor]:
        shift, scale = mod[0], mod[1]
        q, k, v = split_heads(self.qkv(modulate(layer_norm(x), shift, scale)), heads)  # (B, H, S, hd) each
        return self.q_norm(q), self.k_norm(k), v

    def post_attention(self, x: Tensor, attn: Tensor, mod: tuple[Tensor, ...]) -> Tensor:
        _, _, gate1, shift2, scale2, gate2 = mod
        x = x + gate1 * self.proj(attn)
        return x + gate2 * self.mlp(modulate(layer_norm(x), shift2, scale2))


class DoubleStreamBlock(nn.Module):
    """Separate weights for the text and the media stream, one joint attention over [text; media]."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.txt = StreamParams(hidden, heads, mlp_ratio)
        self.img = StreamParams(hidden, heads, mlp_ratio)

    def forward(
        self, txt: Tensor, img: Tensor, txt_cond: TimeCond, img_cond: TimeCond,
        rope: tuple[Tensor, Tensor], mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """txt (B, L, D), img (B, N, D) -> same shapes."""
        txt_mod, img_mod = self.txt.mod(txt_cond), self.img.mod(img_cond)
        tq, tk, tv = self.txt.pre_attention(txt, txt_mod, self.heads)
        iq, ik, iv = self.img.pre_attention(img, img_mod, self.heads)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((tq, iq), (tk, ik), (tv, iv)))  # (B, H, L+N, hd)
        attn = attention(q, k, v, rope, mask)  # (B, L+N, D)
        length = txt.shape[1]
        txt = self.txt.post_attention(txt, attn[:, :length], txt_mod)
        img = self.img.post_attention(img, attn[:, length:], img_mod)
        return txt, img


class SingleStreamBlock(nn.Module):
    """FLUX single-stream block: fused qkv + MLP-in, parallel attention and MLP, fused out (~15 D^2)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads, self.hidden = heads, hidden
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.mod = Modulation(hidden, 3)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.q_norm, self.k_norm = RMSNorm(hidden // heads), RMSNorm(hidden // heads)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x: Tensor, cond: TimeCond, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        """x (B, L+N, D) -> (B, L+N, D)."""
        shift, scale, gate = self.mod(cond)
        fused = self.linear1(modulate(layer_norm(x), shift, scale))  # (B, S, 3D + M)
        qkv, mlp_in = fused.split([3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.heads)
        attn = attention(self.q_norm(q), self.k_norm(k), v, rope, mask)  # (B, S, D)
        return x + gate * self.linear2(torch.cat([attn, self.act(mlp_in)], dim=-1))


class FinalLayer(nn.Module):
    """Per-modality output head: adaLN (shift, scale) + Linear(D, token_dim)."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.mod = Modulation(hidden, 2)
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor, cond: TimeCond) -> Tensor:
        shift, scale = self.mod(cond)
        return self.linear(modulate(layer_norm(x), shift, scale))
