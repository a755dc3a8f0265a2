"""ODE (Euler) and SDE (Euler-Maruyama) samplers for the per-token flow model.

Convention (DESIGN.md): x_t = (1 - t) x0 + t eps, v = eps - x0, integrate from t = 1 to t = 0.
Tokens with ``seq.loss_mask`` True start at noise (tau = 1) and are integrated to tau = 0 along
``shifted_schedule(steps, shift)``. Every other token keeps its tau throughout and is noised once to
it with the same noise draw: a no-op for clean tokens (tau = 0), pure noise for absent ones (tau = 1),
exactly as the training objective presents them. This is how a policy samples actions given clean
frames. The returned sequence holds the sampled values on loss tokens (their tau set to 0) and the
caller's original values elsewhere.

SDE. For this interpolant E[eps | x_t] = x_t + (1 - t) v, so the score is
    grad log p_t(x) = -(x + (1 - t) v) / t.
With w(t) = c * t (SiT's "sigma" diffusion form: proportional to the noise level; the Self-Flow
ImageNet release's "(1 - t)" in SiT's data-at-1 time), g(t)^2 = 2 w(t) and the reverse SDE run from
t = 1 down to 0 is
    dx = [v - w(t) * score] dt + g(t) dW_bar = [v + c (x + (1 - t) v)] dt + sqrt(2 c t) dW_bar.
It has the same marginals p_t as the ODE dx = v dt for any c >= 0 (c = 0 is the ODE). The last step
is a plain Euler step (the noise-free prediction of x0).

The loop makes no host syncs (no ``.item()``, no branches on tensor values), so it can be captured in
a CUDA graph; the optional level check before the loop is the only sync (skip it with factorize=True).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from worldmodel.timesteps import shifted_schedule
from worldmodel.tokens import TokenSequence, channel_mask

METHODS = ("euler", "euler_maruyama")


def _pair(seq: TokenSequence, uncond: TokenSequence) -> TokenSequence | None:
    """One sequence batching [cond; uncond] for a single forward, or None if the texts cannot be stacked."""
    if seq.layout != uncond.layout or seq.x.shape != uncond.x.shape:
        raise ValueError("uncond_seq must have the same layout and shape as seq for classifier-free guidance")
    text, text_mask = None, None
    if seq.text is not None or uncond.text is not None:
        if seq.text is None or uncond.text is None or seq.text.shape != uncond.text.shape:
            return None  # e.g. conditional text vs the model's null text: two forwards instead
        text = torch.cat([seq.text, uncond.text], dim=0)
        if seq.text_mask is not None or uncond.text_mask is not None:
            ones = torch.ones(seq.text.shape[:2], dtype=torch.bool, device=seq.text.device)
            cm = seq.text_mask if seq.text_mask is not None else ones
            um = uncond.text_mask if uncond.text_mask is not None else ones
            text_mask = torch.cat([cm, um], dim=0)
    return TokenSequence(
        x=torch.cat([seq.x, uncond.x], dim=0), tau=torch.cat([seq.tau, uncond.tau], dim=0), pos=seq.pos,
        layout=seq.layout, loss_mask=torch.cat([seq.loss_mask, uncond.loss_mask], dim=0),
        text=text, text_mask=text_mask,
    )


def _levels_ok(seq: TokenSequence) -> bool:
    """True if every non-sampled token is clean (0) or absent (1), so 3 time levels describe the sequence."""
    other = seq.tau[~seq.loss_mask]
    return bool(((other == 0) | (other == 1)).all())


@torch.no_grad()
def sample(
    model: nn.Module,
    seq: TokenSequence,
    steps: int = 50,
    shift: float = 1.0,
    method: str = "euler",
    guidance: float = 1.0,
    uncond_seq: TokenSequence | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    sde_scale: float = 1.0,
    factorize: bool | None = None,
) -> TokenSequence:
    """Sample the loss-mask tokens of ``seq`` from noise; returns a copy with the sampled values.

    guidance: classifier-free guidance weight w; v = v_u + w (v_c - v_u). w = 1 runs no unconditional
        pass. The unconditional sequence is ``uncond_seq`` or ``seq`` with text None.
    noise: (B, N, C) initial noise (and the noise of absent tokens); drawn from ``generator`` if None.
    sde_scale: c in the diffusion w(t) = c t of the Euler-Maruyama sampler.
    factorize: pass time levels [0, t, 1] to the model; None checks the tokens once (one host sync).
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; use one of {METHODS}")
    if sde_scale < 0:
        raise ValueError(f"sde_scale must be >= 0, got {sde_scale}")
    b, n, c = seq.x.shape
    device, dtype = seq.x.device, seq.x.dtype
    cmask = channel_mask(seq.layout, model.token_dim, c, device=device).to(dtype)  # (N, C)
    if noise is None:
        noise = torch.randn(seq.x.shape, generator=generator, device=device, dtype=dtype)
    elif noise.shape != seq.x.shape:
        raise ValueError(f"noise must have the shape of seq.x {tuple(seq.x.shape)}, got {tuple(noise.shape)}")
    noise = noise * cmask  # padding channels stay zero
    gen = seq.loss_mask  # (B, N) tokens to sample
    gen3 = gen[..., None]  # (B, N, 1)
    fixed = (1.0 - seq.tau[..., None].to(dtype)) * seq.x + seq.tau[..., None].to(dtype) * noise  # (B, N, C)
    x = torch.where(gen3, noise, fixed)  # (B, N, C)

    use_cfg = guidance != 1.0
    uncond, paired = None, None
    if use_cfg:
        uncond = uncond_seq if uncond_seq is not None else seq.with_values(seq.x, text=None, text_mask=None)
        paired = _pair(seq, uncond)
    if factorize is None:
        factorize = _levels_ok(seq) and (not use_cfg or _levels_ok(uncond))
    index = None
    if factorize:
        index = torch.where(gen, 1, (seq.tau == 1).long() * 2)  # (B, N): 0 -> level 0, t -> 1, 1 -> 2
    zeros = torch.zeros(b, device=device, dtype=seq.tau.dtype)

    def forward(template: TokenSequence, xs: Tensor, tau: Tensor, levels: Tensor | None, idx: Tensor | None) -> Tensor:
        return model(template.with_values(xs, tau, time_levels=levels, time_index=idx)).velocity

    def velocity(xs: Tensor, t: Tensor) -> Tensor:  # (B, N, C)
        tau = torch.where(gen, t, seq.tau)  # (B, N)
        levels = torch.stack([zeros, t.expand(b), zeros + 1], dim=1) if factorize else None  # (B, 3)
        if not use_cfg:
            return forward(seq, xs, tau, levels, index)
        tau_u = torch.where(uncond.loss_mask, t, uncond.tau)
        if paired is not None:
            lv = torch.cat([levels, levels]) if factorize else None
            ix = torch.cat([index, index]) if factorize else None
            v = forward(paired, torch.cat([xs, xs]), torch.cat([tau, tau_u]), lv, ix)
            v_c, v_u = v[:b], v[b:]
        else:
            v_c = forward(seq, xs, tau, levels, index)
            v_u = forward(uncond, xs, tau_u, levels, index)
        return v_u + guidance * (v_c - v_u)

    sched = shifted_schedule(steps, shift).to(device=device, dtype=seq.tau.dtype)  # (steps + 1,)
    for i in range(int(steps)):
        t, t_next = sched[i], sched[i + 1]
        v = velocity(x, t).to(dtype)
        if method == "euler" or i == steps - 1:
            x_new = x + (t_next - t).to(dtype) * v
        else:
            h = (t - t_next).to(dtype)
            drift = v + sde_scale * (x + (1.0 - t).to(dtype) * v)  # v - w(t) * score
            z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype) * cmask
            x_new = x - h * drift + torch.sqrt(2.0 * sde_scale * t.to(dtype) * h) * z
        x = torch.where(gen3, x_new, x)

    out_x = torch.where(gen3, x, seq.x)
    out_tau = torch.where(gen, torch.zeros_like(seq.tau), seq.tau)
    return seq.with_values(out_x, out_tau)
