"""The Self-Flow objective and EMA teacher against the real tiny backbone, plus a toy 2-D mixture run."""

import pytest
import torch
from gaussian_mixture import MEANS, STD, WEIGHTS, _mixture_stats
from torch import nn

from worldmodel.sampling import sample
from worldmodel.selfflow import EMA, SelfFlowConfig, SelfFlowObjective, dual_timestep, noised
from worldmodel.sizes import build_model
from worldmodel.timesteps import TimestepDistribution
from worldmodel.tokens import TokenSequence, channel_mask

torch.set_num_threads(1)


class Recorder(nn.Module):
    """Wraps a model, records its calls, and can add junk to outputs at tokens outside the loss mask."""

    def __init__(self, inner, junk=0.0, everywhere=False):
        super().__init__()
        self.inner, self.junk, self.everywhere, self.calls = inner, junk, everywhere, []

    @property
    def token_dim(self):
        return self.inner.token_dim

    def forward(self, seq, return_hidden=(), stop_after=None):
        self.calls.append({"seq": seq, "return_hidden": tuple(return_hidden), "stop_after": stop_after})
        out = self.inner(seq, return_hidden=return_hidden, stop_after=stop_after)
        if not self.junk:
            return out
        off = (torch.ones_like(seq.loss_mask) if self.everywhere else ~seq.loss_mask)[..., None]  # (B, N, 1)
        vel = None if out.velocity is None else out.velocity + self.junk * off
        hidden = {k: h + self.junk * off * torch.randn_like(h) for k, h in out.hidden.items()}
        return type(out)(vel, hidden)


def _seq(batch=3, text=False):
    """Mixed layout: 2 clean video context tokens, 1 absent video token, 3 noised video tokens, 2 actions."""
    layout = (("video", 6), ("action", 2))
    x = torch.randn(batch, 8, 48, generator=torch.Generator().manual_seed(5))
    x[:, 6:, 7:] = 0  # action padding channels
    tau = torch.zeros(batch, 8)
    tau[:, 2] = 1.0
    loss_mask = torch.ones(batch, 8, dtype=torch.bool)
    loss_mask[:, :3] = False
    pos = torch.zeros(8, 3)
    pos[:, 0] = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1])
    pos[:6, 1] = torch.tensor([0, 1, 0, 1, 0, 1])
    txt = torch.randn(batch, 3, 256) if text else None
    return TokenSequence(x=x, tau=tau, pos=pos, layout=layout, loss_mask=loss_mask, text=txt)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny")


def test_block_defaults_match_public_release():
    assert SelfFlowConfig().blocks(28) == (7, 19)  # release: blocks 8 and 20 of 28, 1-based
    assert SelfFlowConfig().blocks(4) == (0, 2)
    with pytest.raises(ValueError, match="deeper"):
        SelfFlowConfig(student_block=2, teacher_block=1).blocks(4)
    with pytest.raises(ValueError, match="0..3"):
        SelfFlowConfig(teacher_block=4).blocks(4)


def test_student_and_teacher_inputs_share_eps(tiny):
    cfg = SelfFlowConfig()
    obj = SelfFlowObjective.for_model(tiny, cfg)
    student, teacher = Recorder(tiny), Recorder(EMA(tiny).model)
    seq = _seq()
    obj.loss(student, teacher, seq, torch.Generator().manual_seed(7))
    # Replay the same draws: dual timestep first, then eps.
    g = torch.Generator().manual_seed(7)
    dual = dual_timestep(seq, cfg, g)
    eps = torch.randn(seq.x.shape, generator=g) * channel_mask(seq.layout, tiny.token_dim, 48)
    s_call, t_call = student.calls[0], teacher.calls[0]
    t, s = dual.time_levels[:, 2:3], dual.time_levels[:, 3:4]
    assert torch.equal(s_call["seq"].x, noised(seq.x, eps, dual.tau_student))
    assert torch.equal(t_call["seq"].tau[:, 3:], torch.minimum(t, s).expand(-1, 5))
    expected = (1 - t_call["seq"].tau[..., None]) * seq.x + t_call["seq"].tau[..., None] * eps
    assert torch.allclose(t_call["seq"].x, expected, atol=1e-6)
    assert torch.equal(t_call["seq"].x[:, :2], seq.x[:, :2])  # clean context kept
    assert torch.equal(t_call["seq"].x[:, 2], eps[:, 2])  # absent token = pure noise
    assert s_call["return_hidden"] == (obj.student_block,)
    assert t_call["stop_after"] == obj.teacher_block and t_call["return_hidden"] == (obj.teacher_block,)
    assert len(student.calls) == 1 and len(teacher.calls) == 1


def test_teacher_gets_no_grad_and_every_used_student_param_does(tiny):
    obj = SelfFlowObjective.for_model(tiny, SelfFlowConfig())
    ema = EMA(tiny)
    tiny.zero_grad(set_to_none=True)
    loss, metrics = obj.loss(tiny, ema.model, _seq(), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in ema.model.parameters())
    assert not ema.model.training
    unused = ("text_in.",) + tuple(f"{io}.{m}." for io in ("inputs", "outputs") for m in ("image", "audio", "state"))
    for name, p in tiny.named_parameters():
        if not name.startswith(unused):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in obj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(metrics) == {"loss", "flow", "rep", "flow/video", "flow/action"}
    assert float(metrics["loss"]) == pytest.approx(float(metrics["flow"] + 0.8 * metrics["rep"]), rel=1e-5)
    tiny.zero_grad(set_to_none=True)


def test_tokens_outside_loss_mask_do_not_enter_the_loss(tiny):
    obj = SelfFlowObjective.for_model(tiny, SelfFlowConfig())
    teacher = EMA(tiny).model
    seq = _seq()
    base, _ = obj.loss(tiny, teacher, seq, torch.Generator().manual_seed(3))
    junk, _ = obj.loss(Recorder(tiny, 50.0), Recorder(teacher, 50.0), seq, torch.Generator().manual_seed(3))
    assert torch.allclose(base, junk, atol=1e-6)  # huge outputs at non-loss tokens change nothing
    # ... whereas junk on every token does change the loss (the check has power).
    everywhere, _ = obj.loss(Recorder(tiny, 50.0, everywhere=True), Recorder(teacher, 50.0, everywhere=True), seq,
                             torch.Generator().manual_seed(3))
    assert not torch.allclose(base, everywhere)


def test_plain_flow_matching_equals_hand_computed_fm(tiny):
    class NoTeacher(nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("plain flow matching must not run the teacher")

    seq = _seq(text=True)
    dist = TimestepDistribution("logit_normal", shift=2.0)
    plain = SelfFlowObjective.for_model(tiny, SelfFlowConfig.plain_flow_matching(timesteps=dist))
    assert plain.projector is None
    loss, metrics = plain.loss(tiny, None, seq, torch.Generator().manual_seed(11))
    loss2, _ = SelfFlowObjective.for_model(tiny, SelfFlowConfig(mask_ratio={m: 0.0 for m in tiny.token_dim},
                                                                 gamma=0.0, timesteps=dist)).loss(
        tiny, NoTeacher(), seq, torch.Generator().manual_seed(11))
    # By hand: one t per sample on all loss tokens, x_t = (1 - t) x0 + t eps, MSE on real channels.
    g = torch.Generator().manual_seed(11)
    t = dist.sample((3,), g)
    dist.sample((3,), g)  # s (unused without masking)
    torch.rand(seq.tau.shape, generator=g)  # mask draw
    cm = channel_mask(seq.layout, tiny.token_dim, 48)
    eps = torch.randn(seq.x.shape, generator=g) * cm
    tau = torch.where(seq.loss_mask, t[:, None], seq.tau)
    v = tiny(seq.with_values(noised(seq.x, eps, tau), tau)).velocity
    valid = seq.loss_mask[..., None] & cm
    expected = ((v - (eps - seq.x)) ** 2)[valid.expand_as(v)].mean()
    assert torch.allclose(loss, expected, rtol=1e-5) and torch.allclose(loss2, expected, rtol=1e-5)
    assert float(metrics["rep"]) == 0.0 and float(metrics["loss"]) == pytest.approx(float(metrics["flow"]))
    with pytest.raises(ValueError, match="teacher"):
        SelfFlowObjective.for_model(tiny, SelfFlowConfig()).loss(tiny, None, seq)


def test_ema_update_math_with_and_without_warmup():
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(student, decay=0.9, warmup=True)
    t0 = ema.model[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
        student[1].running_mean.fill_(5.0)
    s1 = student[0].weight.clone()
    ema.update(student)  # n = 0: d = min(0.9, 1/10) = 0.1
    t1 = 0.1 * t0 + 0.9 * s1
    assert torch.allclose(ema.model[0].weight, t1)
    assert torch.equal(ema.model[1].running_mean, torch.full((2,), 5.0))
    with torch.no_grad():
        student[0].weight.mul_(2.0)
    ema.update(student)  # n = 1: d = min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.model[0].weight, d * t1 + (1 - d) * 2 * s1)
    for _ in range(200):
        ema.update(student)
    assert ema.current_decay() == 0.9 and ema.step == 202
    plain = EMA(student, decay=0.9, warmup=False)
    before = plain.model[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(3.0)
    plain.update(student)
    assert torch.allclose(plain.model[0].weight, 0.9 * before + 0.1 * student[0].weight)
    # state dict round trip, step count included
    other = EMA(student, decay=0.5, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert other.step == 202 and other.decay == 0.9 and other.warmup
    assert torch.equal(other.model[0].weight, ema.model[0].weight)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"model": {}})


# ------------------------------------------------------------------------- toy 2-D Gaussian mixture
N_TOK = 4


def _mixture_batch(batch, g):
    k = torch.multinomial(WEIGHTS, batch * N_TOK, replacement=True, generator=g)
    x = (MEANS[k] + STD * torch.randn(batch * N_TOK, 2, generator=g)).view(batch, N_TOK, 2)
    return _toy_seq(x)


def _toy_seq(x):
    pos = torch.zeros(N_TOK, 3)
    pos[:, 0] = torch.arange(N_TOK)
    b = x.shape[0]
    return TokenSequence(x=x, tau=torch.zeros(b, N_TOK), pos=pos, layout=(("action", N_TOK),),
                         loss_mask=torch.ones(b, N_TOK, dtype=torch.bool))


def _train(cfg, steps=300):
    torch.manual_seed(0)
    model = build_model("tiny", token_dim={"action": 2})
    obj = SelfFlowObjective.for_model(model, cfg)
    ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.uses_teacher else None
    opt = torch.optim.AdamW([*model.parameters(), *obj.parameters()], lr=2e-3, weight_decay=0.0)
    g, history = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        loss, metrics = obj.loss(model, ema.model if ema else None, _mixture_batch(64, g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema:
            ema.update(model)
        history.append(metrics)
    return model.eval(), history


@pytest.fixture(scope="module")
def toy_models():
    uniform = TimestepDistribution("uniform")
    return {
        "plain": _train(SelfFlowConfig.plain_flow_matching(timesteps=uniform)),
        "selfflow": _train(SelfFlowConfig(timesteps=uniform)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "selfflow"])
def test_toy_training_reduces_loss(toy_models, name):
    history = toy_models[name][1]
    first = sum(h["flow"] for h in history[:30]) / 30
    last = sum(h["flow"] for h in history[-30:]) / 30
    assert last < 0.9 * first, (first, last)  # the FM loss has a high floor (eps variance), so 10% is large
    if name == "selfflow":
        assert history[-1]["rep"] < history[0]["rep"] - 0.3  # student features align with the teacher's


@pytest.mark.parametrize("name,method,steps", [("plain", "euler", 25), ("selfflow", "euler", 25),
                                               ("selfflow", "euler_maruyama", 50)])
@pytest.mark.slow
def test_trained_tiny_model_reproduces_mixture(toy_models, name, method, steps):
    model = toy_models[name][0]
    out = sample(model, _toy_seq(torch.zeros(400, N_TOK, 2)), steps=steps, method=method,
                 generator=torch.Generator().manual_seed(1))
    weights, means, stds = _mixture_stats(out.x.reshape(-1, 2))
    # After 300 steps: every mode present with roughly its weight, centred, and sharp (noise has std 1).
    assert torch.allclose(weights, WEIGHTS, atol=0.08), weights
    assert torch.allclose(means, MEANS, atol=0.3), means
    assert ((stds > 0.2) & (stds < 0.5)).all(), stds


def test_flow_metric_only_for_modalities_with_loss_tokens(tiny):
    """A modality present only as clean context (the policy mode's video) reports flow/<m> as NaN ("not reported",
    skipped by the trainer's averages), not a zero; metrics stay on the device (no host sync)."""
    obj = SelfFlowObjective.for_model(tiny, SelfFlowConfig())
    seq = _seq()
    policy_like = seq.with_values(seq.x, loss_mask=seq.loss_mask & (torch.arange(8) >= 6))  # actions only
    _, metrics = obj.loss(tiny, EMA(tiny).model, policy_like, torch.Generator().manual_seed(0))
    assert set(metrics) == {"loss", "flow", "rep", "flow/action", "flow/video"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    assert torch.isnan(metrics["flow/video"])
    assert float(metrics["flow/action"]) == pytest.approx(float(metrics["flow"]), rel=1e-5)
