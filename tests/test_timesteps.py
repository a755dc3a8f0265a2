"""Timestep distributions, schedules, and the dual-timestep marginal (KS tests, fixed seeds)."""

import pytest
import torch
from scipy import stats

from worldmodel.selfflow import SelfFlowConfig, dual_timestep, teacher_time_index
from worldmodel.timesteps import TimestepDistribution, shift_time, shifted_schedule, unshift_time
from worldmodel.tokens import TokenSequence

DISTS = [
    TimestepDistribution("uniform"),
    TimestepDistribution("uniform", shift=3.0),
    TimestepDistribution("logit_normal", mean=0.0, std=1.0),
    TimestepDistribution("logit_normal", mean=-0.4, std=1.2, shift=3.0),
]


def _ks(samples: torch.Tensor, dist: TimestepDistribution) -> float:
    return stats.kstest(samples.double().numpy(), lambda v: dist.cdf(torch.as_tensor(v)).numpy()).pvalue


@pytest.mark.parametrize("dist", DISTS, ids=lambda d: f"{d.kind}-shift{d.shift}")
def test_sample_matches_cdf(dist):
    g = torch.Generator().manual_seed(0)
    t = dist.sample((20000,), g)
    assert t.min() >= 0 and t.max() <= 1
    assert _ks(t, dist) > 0.01


def test_ks_has_power_against_wrong_distribution():
    g = torch.Generator().manual_seed(0)
    t = TimestepDistribution("logit_normal").sample((20000,), g)
    assert _ks(t, TimestepDistribution("uniform")) < 1e-6
    assert _ks(t, TimestepDistribution("logit_normal", shift=1.5)) < 1e-6


def test_shift_roundtrip_and_direction():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(unshift_time(shift_time(t, 3.0), 3.0), t)
    assert (shift_time(t, 3.0) >= t).all()  # a > 1 moves mass toward noise (t = 1)
    assert torch.isclose(shift_time(torch.tensor(0.5), 3.0), torch.tensor(0.75))


def test_shifted_schedule():
    s = shifted_schedule(10, 1.0)
    assert s.shape == (11,) and s[0] == 1 and s[-1] == 0
    assert torch.allclose(s, torch.linspace(1, 0, 11))
    s3 = shifted_schedule(10, 3.0)
    assert s3[0] == 1 and s3[-1] == 0 and (s3[1:] < s3[:-1]).all() and (s3 >= s).all()
    with pytest.raises(ValueError, match="at least 1 step"):
        shifted_schedule(0)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="kind"):
        TimestepDistribution("cosine")
    with pytest.raises(ValueError, match="std"):
        TimestepDistribution("logit_normal", std=0.0)


def _seq(batch: int, layout=(("image", 3), ("action", 2)), tau_other=None) -> TokenSequence:
    n = sum(c for _, c in layout)
    loss_mask = torch.ones(batch, n, dtype=torch.bool)
    tau = torch.zeros(batch, n)
    if tau_other is not None:  # first token is conditioning with this tau
        loss_mask[:, 0] = False
        tau[:, 0] = tau_other
    return TokenSequence(x=torch.zeros(batch, n, 4), tau=tau, pos=torch.zeros(n, 3), layout=layout, loss_mask=loss_mask)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("dist", [DISTS[0], DISTS[3]], ids=["uniform", "logitnormal-shift3"])
def test_dual_timestep_marginal_is_p_t(ratio, dist):
    cfg = SelfFlowConfig(mask_ratio={m: ratio for m in ("image", "video", "audio", "action")}, timesteps=dist)
    g = torch.Generator().manual_seed(1)
    dual = dual_timestep(_seq(8000), cfg, g)
    for token in (0, 4):  # one token per sample (iid across samples), in each modality
        assert _ks(dual.tau_student[:, token], dist) > 0.01
    # The teacher time min(t, s) is NOT distributed as p(t) unless nothing is masked: the KS test can tell.
    assert _ks(dual.tau_teacher[:, 0], dist) < 1e-6
    assert (dual.tau_teacher <= dual.tau_student + 1e-7).all()
    # The masked fraction matches the ratio (tokens at s differ from the sample's t).
    t = dual.time_levels[:, 2:3]
    frac = (dual.tau_student != t).float().mean().item()
    assert abs(frac - ratio) < 0.02


def test_levels_factorise_student_and_teacher_times():
    cfg = SelfFlowConfig()
    g = torch.Generator().manual_seed(2)
    seq = _seq(64, tau_other=1.0)
    dual = dual_timestep(seq, cfg, g)
    assert dual.time_levels.shape == (64, 4)
    assert torch.equal(dual.time_levels.gather(1, dual.time_index), dual.tau_student)
    assert torch.equal(dual.time_levels.gather(1, teacher_time_index(dual, seq.loss_mask)), dual.tau_teacher)
    assert (dual.tau_student[:, 0] == 1).all() and (dual.tau_teacher[:, 0] == 1).all()  # absent token kept
    # Non-loss tokens at a time other than 0/1 cannot be factorised into 4 levels: no levels given.
    dual = dual_timestep(_seq(4, tau_other=0.3), cfg, g)
    assert dual.time_levels is None and torch.allclose(dual.tau_student[:, 0], torch.tensor(0.3))


def test_mask_ratio_per_modality():
    cfg = SelfFlowConfig(mask_ratio={"image": 0.0, "video": 0.0, "audio": 0.0, "action": 1.0})
    dual = dual_timestep(_seq(256), cfg, torch.Generator().manual_seed(3))
    t, s = dual.time_levels[:, 2:3], dual.time_levels[:, 3:4]
    assert torch.equal(dual.tau_student[:, :3], t.expand(-1, 3))  # images never masked
    assert torch.equal(dual.tau_student[:, 3:], s.expand(-1, 2))  # actions always masked
    with pytest.raises(ValueError, match="no entry for 'action'"):
        dual_timestep(_seq(2), SelfFlowConfig(mask_ratio={"image": 0.2}))


def test_modality_shift_moves_only_that_modality():
    dist = DISTS[2]
    cfg = SelfFlowConfig(timesteps=dist, modality_shift={"action": 4.0})
    seq = _seq(8000, tau_other=1.0)  # token 0 absent, tokens 1-2 images, 3-4 actions
    dual = dual_timestep(seq, cfg, torch.Generator().manual_seed(4))
    shifted = TimestepDistribution(dist.kind, dist.mean, dist.std, shift=4.0)
    assert _ks(dual.tau_student[:, 1], dist) > 0.01 and _ks(dual.tau_student[:, 4], shifted) > 0.01
    assert _ks(dual.tau_student[:, 4], dist) < 1e-6  # the KS test can tell the two apart
    # Six levels [0, 1, t, s, t', s'] still factorise the student and (lower-noise) teacher times exactly.
    assert dual.time_levels.shape == (8000, 6)
    assert torch.equal(dual.time_levels.gather(1, dual.time_index), dual.tau_student)
    assert torch.equal(dual.time_levels.gather(1, teacher_time_index(dual, seq.loss_mask)), dual.tau_teacher)
    assert (dual.tau_teacher <= dual.tau_student + 1e-7).all()
    # A layout without actions ignores the action shift; bad names and values are refused.
    assert dual_timestep(_seq(4, layout=(("image", 3),)), cfg).time_levels.shape == (4, 4)
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        SelfFlowConfig(modality_shift={"smell": 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        SelfFlowConfig(modality_shift={"action": 0.0})
