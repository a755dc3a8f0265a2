"""The Self-Flow objective: dual-timestep flow matching plus EMA-teacher representation alignment.

Convention (docs/ARCHITECTURE.md; worldmodel/timesteps.py): x_t = (1 - t) x0 + t eps, the network predicts v = eps - x0.
Per sample, t and s are drawn independently from p(t); each token in ``seq.loss_mask`` is masked
with probability R_M (its modality's mask ratio) and gets tau = s if masked, else t. The student
sees that sequence; the EMA teacher sees the same eps at min(t, s) and runs only up to block k.
Loss = L_flow + gamma * L_rep, with L_rep the negative cosine between projector(student block l)
and teacher block k, per token. ``SelfFlowConfig.plain_flow_matching()`` (R_M = 0, gamma = 0)
is plain flow matching through the same code; the teacher is then never run.

Block numbering: model blocks 0..depth-1 (double-stream then single-stream, as in model.py);
``hidden[i]`` is the output of block i. The public ImageNet release's "student block 8, teacher
block 20 of 28" are 1-based, i.e. blocks 7 and 19 here; the defaults reproduce exactly that:
student = round(0.3 * depth) - 1, teacher = round(0.7 * depth) - 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodel.ema import EMA  # noqa: F401  (re-exported: older imports)
from worldmodel.timesteps import TimestepDistribution, shift_time
from worldmodel.tokens import CONDITIONING_MODALITIES, MODALITIES, TokenSequence, channel_mask, segment_slices

# Mask ratio for actions: 0.25 (same as images). Action chunks are short (about 16 tokens), so a
# 0.5 audio-like ratio often leaves almost no token at the cleaner time; 0.25 is a starting point
# to be measured against 0 and 0.5 in fine-tuning ablations.
DEFAULT_MASK_RATIO = {"image": 0.25, "video": 0.1, "audio": 0.5, "action": 0.25}


@dataclass
class SelfFlowConfig:
    """Hyper-parameters of the objective (paper values by default)."""

    enabled: bool = True  # False = plain flow matching (mask ratios and gamma treated as 0)
    mask_ratio: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MASK_RATIO))  # R_M per modality
    gamma: float = 0.8  # weight of the representation loss
    student_block: int | None = None  # 0-based block l; None = round(0.3 * depth) - 1
    teacher_block: int | None = None  # 0-based block k; None = round(0.7 * depth) - 1
    timesteps: TimestepDistribution = field(default_factory=TimestepDistribution)  # p(t) for t and s
    # Extra time shift per modality on top of ``timesteps``: tokens of modality m get shift_time(t, a_m) (and
    # shift_time(s, a_m)). a > 1 trains more at noisy times, where the answer must come from the context: pi0
    # does this for actions, whose few channels are otherwise denoised from the noisy input itself.
    modality_shift: dict[str, float] = field(default_factory=dict)
    ema_decay: float = 0.9999  # teacher EMA decay
    # EMA warmup: decay_n = min(decay, (1 + n) / (10 + n)). With 0.9999 and no warmup the teacher
    # stays at the random init for ~10k steps, which makes short runs (tests, fine-tunes) meaningless.
    ema_warmup: bool = True
    projector_mult: int = 2  # projector hidden width = projector_mult * model hidden

    def __post_init__(self) -> None:
        for modality, ratio in self.mask_ratio.items():
            if modality not in MODALITIES:
                raise ValueError(f"mask_ratio names unknown modality {modality!r}; valid ones: {MODALITIES}")
            if not 0.0 <= float(ratio) <= 1.0:
                raise ValueError(f"mask_ratio[{modality!r}] = {ratio} must lie in [0, 1]")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if isinstance(self.timesteps, dict):  # from a Hydra/JSON config
            self.timesteps = TimestepDistribution(**self.timesteps)
        for modality, shift in self.modality_shift.items():
            if modality not in MODALITIES:
                raise ValueError(f"modality_shift names unknown modality {modality!r}; valid ones: {MODALITIES}")
            if not float(shift) > 0:
                raise ValueError(f"modality_shift[{modality!r}] = {shift} must be > 0 (1.0 = no extra shift)")
        self.modality_shift = {m: float(a) for m, a in self.modality_shift.items() if float(a) != 1.0}

    @classmethod
    def plain_flow_matching(cls, **overrides) -> SelfFlowConfig:
        """The baseline every paper comparison uses: mask ratio 0, gamma 0, no teacher."""
        zero = {m: 0.0 for m in MODALITIES}
        return cls(**{"enabled": False, "mask_ratio": zero, "gamma": 0.0, **overrides})

    @property
    def uses_teacher(self) -> bool:
        return self.enabled and self.gamma > 0

    def ratio(self, modality: str) -> float:
        if not self.enabled or modality in CONDITIONING_MODALITIES:  # never noised: no second time to draw
            return 0.0
        if modality not in self.mask_ratio:
            raise ValueError(f"SelfFlowConfig.mask_ratio has no entry for {modality!r}; add one (e.g. 0.25)")
        return float(self.mask_ratio[modality])

    def blocks(self, depth: int) -> tuple[int, int]:
        """(student block l, teacher block k), 0-based, validated against ``depth``."""
        student = self.student_block if self.student_block is not None else max(round(0.3 * depth) - 1, 0)
        teacher = self.teacher_block if self.teacher_block is not None else min(round(0.7 * depth) - 1, depth - 1)
        if not 0 <= student < depth or not 0 <= teacher < depth:
            raise ValueError(f"student_block={student} / teacher_block={teacher} must lie in 0..{depth - 1}")
        if self.uses_teacher and teacher <= student:
            raise ValueError(f"teacher_block ({teacher}) must be deeper than student_block ({student})")
        return student, teacher


class DualTimestep(NamedTuple):
    tau_student: Tensor  # (B, N) s on masked loss tokens, t on the other loss tokens, seq.tau elsewhere
    tau_teacher: Tensor  # (B, N) min(t, s) on loss tokens, seq.tau elsewhere
    # (B, 4 + 2K) [0, 1, t, s, then (t, s) shifted for each of the K modalities with a modality_shift];
    # None if non-loss tokens carry times other than 0 / 1.
    time_levels: Tensor | None
    time_index: Tensor | None  # (B, N) long, tau_student == time_levels.gather(1, time_index)
    level_offset: Tensor | None = None  # (N,) long, 2k for the k-th shifted modality's tokens, else 0


def _mask_ratios(layout, config: SelfFlowConfig, device) -> Tensor:
    """(N,) mask ratio of each token's modality."""
    return torch.cat([torch.full((count,), config.ratio(m), device=device) for m, count in layout])


def dual_timestep(seq: TokenSequence, config: SelfFlowConfig, generator: torch.Generator | None = None,
                  factorize: bool | None = None) -> DualTimestep:
    """Draw the Self-Flow per-token times for ``seq`` (see the module docstring).

    factorize: also return the level factorisation (valid when every token outside ``seq.loss_mask`` is clean
    (tau 0) or absent (tau 1), as in every training sequence the tasks build); None checks the tokens (one host
    sync), True trusts the caller (no sync), False returns per-token times only.
    """
    b, device = seq.batch_size, seq.x.device
    t = config.timesteps.sample((b,), generator, device)  # (B,)
    s = config.timesteps.sample((b,), generator, device)  # (B,)
    ratio = _mask_ratios(seq.layout, config, device)  # (N,)
    masked = torch.rand(seq.tau.shape, generator=generator, device=device) < ratio  # (B, N)
    loss = seq.loss_mask
    shifted = [m for m in config.modality_shift if any(name == m for name, _ in seq.layout)]
    token_shift = torch.cat([torch.full((n,), config.modality_shift.get(m, 1.0), device=device)
                             for m, n in seq.layout])  # (N,)
    t_tok, s_tok = shift_time(t[:, None], token_shift), shift_time(s[:, None], token_shift)  # (B, N)
    tau_student = torch.where(loss, torch.where(masked, s_tok, t_tok), seq.tau)  # (B, N)
    # A shift is monotone, so min(t, s) shifted is the shifted min: the teacher stays at the lower noise.
    tau_teacher = torch.where(loss, torch.minimum(t_tok, s_tok), seq.tau)  # (B, N)

    # Level factorisation; only valid if every non-loss token is clean (0) or absent (1).
    if factorize is None:  # one host sync; tasks pass factorize=True
        factorize = bool(((seq.tau == 0) | (seq.tau == 1) | loss).all())
    if factorize:
        zeros, ones = torch.zeros_like(t), torch.ones_like(t)
        extra = [v for m in shifted for v in (shift_time(t, config.modality_shift[m]),
                                              shift_time(s, config.modality_shift[m]))]
        levels = torch.stack([zeros, ones, t, s, *extra], dim=1).to(seq.tau.dtype)  # (B, 4 + 2K)
        offset = torch.cat([torch.full((n,), 2 * (shifted.index(m) + 1) if m in shifted else 0, device=device)
                            for m, n in seq.layout])  # (N,)
        base = (seq.tau == 1).long()  # (B, N) 0 -> level 0, 1 -> level 1
        index = torch.where(loss, torch.where(masked, 3, 2) + offset, base)  # (B, N)
        return DualTimestep(tau_student, tau_teacher, levels, index, offset)
    return DualTimestep(tau_student, tau_teacher, None, None)


def teacher_time_index(dual: DualTimestep, loss_mask: Tensor) -> Tensor | None:
    """(B, N) index into ``dual.time_levels`` giving ``dual.tau_teacher`` (level of min(t, s))."""
    if dual.time_levels is None:
        return None
    lower = torch.where(dual.time_levels[:, 2] <= dual.time_levels[:, 3], 2, 3)  # (B,)
    offset = dual.level_offset if dual.level_offset is not None else 0
    return torch.where(loss_mask, lower[:, None] + offset, dual.time_index)


class Projector(nn.Module):
    """Two-layer MLP (D -> mult*D -> D, GELU) mapping student features toward teacher features."""

    def __init__(self, hidden_size: int, mult: int = 2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, mult * hidden_size), nn.GELU(), nn.Linear(mult * hidden_size, hidden_size)
        )

    def forward(self, h: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        return self.net(h)


def noised(x0: Tensor, eps: Tensor, tau: Tensor) -> Tensor:
    """x_tau = (1 - tau) x0 + tau eps with per-token tau (B, N) broadcast over channels."""
    tau = tau[..., None].to(x0.dtype)
    return (1.0 - tau) * x0 + tau * eps


class SelfFlowObjective(nn.Module):
    """Holds the config and the projector; ``loss`` computes L_flow + gamma * L_rep."""

    def __init__(self, config: SelfFlowConfig, hidden_size: int, num_blocks: int):
        super().__init__()
        self.config = config
        self.student_block, self.teacher_block = config.blocks(num_blocks)
        self.projector = Projector(hidden_size, config.projector_mult) if config.uses_teacher else None

    @classmethod
    def for_model(cls, model: nn.Module, config: SelfFlowConfig) -> SelfFlowObjective:
        return cls(config, model.hidden_size, model.num_blocks)

    def loss(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        seq: TokenSequence,
        generator: torch.Generator | None = None,
        factorize: bool | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss, metrics) for a batch whose ``seq.x`` holds CLEAN values.

        Metrics are detached 0-dim device tensors (no host sync); ``flow/<m>`` is NaN (= not reported) where
        modality m has no loss tokens. factorize: see ``dual_timestep`` (True: no host sync at all).
        """
        cfg = self.config
        if cfg.uses_teacher and teacher is None:
            raise ValueError("Self-Flow with gamma > 0 needs the EMA teacher; pass EMA(...).model as teacher")
        x0 = seq.x  # (B, N, C)
        cmask = channel_mask(seq.layout, student.token_dim, x0.shape[-1], device=x0.device)  # (N, C)
        dual = dual_timestep(seq, cfg, generator, factorize)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * cmask  # (B, N, C)

        student_seq = seq.with_values(
            noised(x0, eps, dual.tau_student), dual.tau_student,
            time_levels=dual.time_levels, time_index=dual.time_index,
        )
        hidden_ids = (self.student_block,) if cfg.uses_teacher else ()
        out = student(student_seq, return_hidden=hidden_ids)

        # Flow loss over loss tokens and real channels only.
        valid = (seq.loss_mask[..., None] & cmask).to(torch.float32)  # (B, N, C)
        sq = (out.velocity.float() - (eps - x0).float()).square() * valid  # (B, N, C)
        flow = sq.sum() / valid.sum().clamp_min(1.0)
        mod_sq: dict[str, Tensor] = {}  # per modality: summed squared error and loss-channel count (scalars)
        mod_n: dict[str, Tensor] = {}
        for modality, sl in segment_slices(seq.layout):
            mod_sq[modality] = mod_sq.get(modality, 0.0) + sq[:, sl].sum()
            mod_n[modality] = mod_n.get(modality, 0.0) + valid[:, sl].sum()

        rep = torch.zeros((), device=x0.device)
        if cfg.uses_teacher:
            teacher_seq = seq.with_values(
                noised(x0, eps, dual.tau_teacher), dual.tau_teacher,
                time_levels=dual.time_levels, time_index=teacher_time_index(dual, seq.loss_mask),
            )
            with torch.no_grad():
                target = teacher(teacher_seq, return_hidden=(self.teacher_block,), stop_after=self.teacher_block)
                target = target.hidden[self.teacher_block].detach()  # (B, N, D)
            pred = self.projector(out.hidden[self.student_block])  # (B, N, D)
            cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # (B, N)
            lm = seq.loss_mask.to(torch.float32)
            rep = -(cos * lm).sum() / lm.sum().clamp_min(1.0)

        loss = flow + cfg.gamma * rep if cfg.uses_teacher else flow
        metrics = {"loss": loss.detach(), "flow": flow.detach(), "rep": rep.detach()}
        for modality in mod_sq:  # NaN where m has no loss tokens: no zeros from conditioning-only modalities
            count = mod_n[modality]
            mean = (mod_sq[modality] / count.clamp_min(1.0)).detach()
            metrics[f"flow/{modality}"] = torch.where(count > 0, mean, torch.full_like(mean, float("nan")))
        return loss, metrics


__all__ = [
    "DEFAULT_MASK_RATIO", "SelfFlowConfig", "DualTimestep", "dual_timestep", "teacher_time_index",
    "Projector", "SelfFlowObjective", "EMA", "noised",
]
