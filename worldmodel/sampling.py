"""ODE (Euler) and SDE (Euler-Maruyama) samplers for the per-token flow model.

Convention (docs/ARCHITECTURE.md): x_t = (1 - t) x0 + t eps, v = eps - x0, integrate from t = 1 to t = 0.
Tokens with ``seq.loss_mask`` True start at noise (tau = 1) and are integrated to tau = 0 along
``shifted_schedule(steps, shift)``, each on its modality's clock: a modality trained with an extra
time shift a_m (``SelfFlowConfig.modality_shift``, e.g. actions at 7.4) visits ``shift_time(u, a_m)``
where the others visit u, so every modality is integrated over the times it was trained on, and joint
sampling pairs the modalities' times exactly as training pairs them (one base time, shifted per
modality). Every other token keeps its tau throughout and is noised once to it with the same noise
draw: a no-op for clean tokens (tau = 0), pure noise for absent ones (tau = 1), exactly as the
training objective presents them. This is how a policy samples actions given clean
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

The loop makes no host syncs (no ``.item()``, no branches on tensor values) and no host-to-device copies, so it
can be captured in a CUDA graph (worldmodel.fast_sampling); the optional level check before the loop is the only
sync (skip it with factorize=True). What depends only on the text and positions (text stream, attention mask,
RoPE: ``WorldModel.prepare_context``) is computed once per call, not once per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from worldmodel.timesteps import shift_time, shifted_schedule
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


def modality_shifts(layout, shifts: dict[str, float] | None, device=None) -> Tensor:
    """(N,) extra time shift of each token's modality (1.0 where the modality has none)."""
    shifts = shifts or {}
    return torch.cat([torch.full((n,), float(shifts.get(m, 1.0)), device=device) for m, n in layout])


def visited_times(layout, steps: int, shift: float = 1.0, modality_shift: dict[str, float] | None = None) -> dict:
    """{modality: (steps,) times at which the sampler evaluates that modality's sampled tokens} (for checks)."""
    sched = shifted_schedule(steps, shift)[:-1]  # (steps,) the evaluation times, noise first
    shifts = modality_shift or {}
    return {m: shift_time(sched, float(shifts.get(m, 1.0))) for m, _ in layout}


@torch.no_grad()
def initial_noise(seq: TokenSequence, generator: torch.Generator | None = None) -> Tensor:
    """(B, N, C) standard normal noise for ``seq`` drawn from ``generator``: what every sampler starts from."""
    return torch.randn(seq.x.shape, generator=generator, device=seq.x.device, dtype=seq.x.dtype)


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
    modality_shift: dict[str, float] | None = None,
) -> TokenSequence:
    """Sample the loss-mask tokens of ``seq`` from noise; returns a copy with the sampled values.

    guidance: classifier-free guidance weight w; v = v_u + w (v_c - v_u). w = 1 runs no unconditional
        pass. The unconditional sequence is ``uncond_seq`` or ``seq`` with text None.
    noise: (B, N, C) initial noise (and the noise of absent tokens); drawn from ``generator`` if None.
    sde_scale: c in the diffusion w(t) = c t of the Euler-Maruyama sampler.
    factorize: pass time levels [0, t, 1, t shifted per modality] to the model; None checks the tokens once
        (one host sync).
    modality_shift: {modality: a_m} extra time shift per modality, as trained (the checkpoint's
        ``objective.modality_shift``); tokens of modality m are integrated along shift_time(schedule, a_m).
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; use one of {METHODS}")
    if sde_scale < 0:
        raise ValueError(f"sde_scale must be >= 0, got {sde_scale}")
    b, n, c = seq.x.shape
    device, dtype = seq.x.device, seq.x.dtype
    cmask = channel_mask(seq.layout, model.token_dim, c, device=device).to(dtype)  # (N, C)
    if noise is None:
        noise = initial_noise(seq, generator)
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
    shifts = {m: float(a) for m, a in (modality_shift or {}).items() if float(a) != 1.0}
    shifted = [m for m in shifts if any(name == m for name, _ in seq.layout)]  # modalities on their own clock
    token_shift = modality_shifts(seq.layout, shifts, device)  # (N,)
    index = None
    if factorize:
        # levels [0, t, 1, t_a1, t_a2, ...]: a sampled token of the k-th shifted modality reads level 3 + k
        level_of = torch.cat([torch.full((n,), 3 + shifted.index(m) if m in shifted else 1, device=device)
                              for m, n in seq.layout])  # (N,)
        index = torch.where(gen, level_of, (seq.tau == 1).long() * 2)  # (B, N)
    zeros = torch.zeros(b, device=device, dtype=seq.tau.dtype)

    context = None
    if not use_cfg and hasattr(model, "prepare_context"):  # constant over the steps: computed once
        autocast = torch.is_autocast_enabled(device.type)
        context = model.prepare_context(seq, torch.get_autocast_dtype(device.type) if autocast else None)

    def forward(template: TokenSequence, xs: Tensor, tau: Tensor, levels: Tensor | None, idx: Tensor | None) -> Tensor:
        step_seq = template.with_values(xs, tau, time_levels=levels, time_index=idx)
        return (model(step_seq) if context is None else model(step_seq, context=context)).velocity

    def velocity(xs: Tensor, t: Tensor) -> Tensor:  # (B, N, C)
        t_tok = shift_time(t, token_shift)  # (N,) each token's time on its modality's clock
        tau = torch.where(gen, t_tok, seq.tau)  # (B, N)
        levels = None
        if factorize:
            extra = [shift_time(t, shifts[m]).expand(b) for m in shifted]
            levels = torch.stack([zeros, t.expand(b), zeros + 1, *extra], dim=1)  # (B, 3 + K)
        if not use_cfg:
            return forward(seq, xs, tau, levels, index)
        tau_u = torch.where(uncond.loss_mask, t_tok, uncond.tau)
        if paired is not None:
            lv = torch.cat([levels, levels]) if factorize else None
            ix = torch.cat([index, index]) if factorize else None
            v = forward(paired, torch.cat([xs, xs]), torch.cat([tau, tau_u]), lv, ix)
            v_c, v_u = v[:b], v[b:]
        else:
            v_c = forward(seq, xs, tau, levels, index)
            v_u = forward(uncond, xs, tau_u, levels, index)
        return v_u + guidance * (v_c - v_u)

    sched = shifted_schedule(steps, shift, device=device).to(dtype=seq.tau.dtype)  # (steps + 1,)
    for i in range(int(steps)):
        t, t_next = sched[i], sched[i + 1]
        v = velocity(x, t).to(dtype)
        tt = shift_time(t, token_shift).to(dtype)[:, None]  # (N, 1) this step's time per token
        tt_next = shift_time(t_next, token_shift).to(dtype)[:, None]  # (N, 1)
        if method == "euler" or i == steps - 1:
            x_new = x + (tt_next - tt) * v
        else:
            h = tt - tt_next  # (N, 1)
            drift = v + sde_scale * (x + (1.0 - tt) * v)  # v - w(t) * score
            z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype) * cmask
            x_new = x - h * drift + torch.sqrt(2.0 * sde_scale * tt * h) * z
        x = torch.where(gen3, x_new, x)

    out_x = torch.where(gen3, x, seq.x)
    out_tau = torch.where(gen, torch.zeros_like(seq.tau), seq.tau)
    return seq.with_values(out_x, out_tau)
