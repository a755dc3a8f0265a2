"""Samplers against an exact (oracle) velocity field of a 2-D Gaussian mixture, plus conditioning and guidance.

The oracle makes the test about the sampler alone: with the true v, Euler and Euler-Maruyama must
reproduce the mixture. Training a real backbone on the mixture is tested in test_selfflow.py.
"""

from types import SimpleNamespace

import pytest
import torch
from gaussian_mixture import MEANS, STD, WEIGHTS, _mixture_stats
from torch import nn

from worldmodel.sampling import sample
from worldmodel.tokens import TokenSequence


def gmm_velocity(x: torch.Tensor, t: torch.Tensor, means=MEANS, weights=WEIGHTS, std=STD) -> torch.Tensor:
    """Exact v(x, t) = E[eps - x0 | x_t = x] for x_t = (1 - t) x0 + t eps. x (..., 2), t (...)."""
    t = t[..., None, None].double()  # (..., 1, 1)
    x = x[..., None, :].double()  # (..., 1, 2)
    mu = means.double()  # (K, 2)
    var = (1 - t) ** 2 * std**2 + t**2  # (..., 1, 1)
    resid = x - (1 - t) * mu  # (..., K, 2)
    logp = torch.log(weights.double()) - 0.5 * (resid**2).sum(-1) / var[..., 0] - torch.log(var[..., 0])  # (..., K)
    post = torch.softmax(logp, dim=-1)[..., None]  # (..., K, 1)
    e_x0 = mu + (1 - t) * std**2 / var * resid
    e_eps = t / var * resid
    return ((e_eps - e_x0) * post).sum(-2).float()  # (..., 2)


class OracleModel(nn.Module):
    """Stands in for WorldModel: 'action' tokens (2 channels) get the exact mixture velocity.

    With text given it uses the mixture above; with text None a different one (shifted means), so
    guidance is visible. Records every call so tests can inspect what the sampler passed in.
    """

    token_dim = {"action": 2, "image": 4}

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, seq: TokenSequence, return_hidden=(), stop_after=None):
        self.calls.append(seq)
        if seq.time_levels is not None:
            assert torch.equal(seq.time_levels.gather(1, seq.time_index), seq.tau)
        means = MEANS if seq.text is not None else MEANS + torch.tensor([0.0, -1.0])
        v = gmm_velocity(seq.x[..., :2], seq.tau, means=means)
        if seq.text is not None and seq.text.shape[0] == seq.x.shape[0]:  # per-row: text all-zero = unconditional
            uncond = gmm_velocity(seq.x[..., :2], seq.tau, means=MEANS + torch.tensor([0.0, -1.0]))
            is_null = (seq.text.abs().sum(dim=(1, 2)) == 0)[:, None, None]
            v = torch.where(is_null, uncond, v)
        out = torch.zeros_like(seq.x)
        out[..., :2] = v
        return SimpleNamespace(velocity=out, hidden={})


def _action_seq(batch, n, text=True, gen=None):
    x = torch.zeros(batch, n, 2)
    tau = torch.zeros(batch, n)
    loss_mask = torch.ones(batch, n, dtype=torch.bool) if gen is None else gen
    txt = torch.ones(batch, 1, 3) if text else None
    return TokenSequence(x=x, tau=tau, pos=torch.zeros(n, 3), layout=(("action", n),), loss_mask=loss_mask, text=txt)


@pytest.mark.parametrize("method,steps,shift", [("euler", 50, 1.0), ("euler", 50, 3.0), ("euler_maruyama", 120, 1.0)])
def test_sampler_reproduces_mixture(method, steps, shift):
    g = torch.Generator().manual_seed(0)
    out = sample(OracleModel(), _action_seq(500, 8), steps=steps, shift=shift, method=method, generator=g)
    weights, means, stds = _mixture_stats(out.x.reshape(-1, 2))
    # 4000 points: weight s.e. <= 0.008; tolerances are ~3.5 s.e. plus discretisation error.
    assert torch.allclose(weights, WEIGHTS, atol=0.03), weights
    assert torch.allclose(means, MEANS, atol=0.06), means
    assert torch.allclose(stds, torch.full((3,), STD), atol=0.06), stds
    assert (out.tau == 0).all()


def test_sde_differs_from_ode_with_same_initial_noise():
    noise = torch.randn(50, 4, 2, generator=torch.Generator().manual_seed(1))
    ode = sample(OracleModel(), _action_seq(50, 4), steps=20, noise=noise)
    sde = sample(OracleModel(), _action_seq(50, 4), steps=20, noise=noise, method="euler_maruyama",
                 generator=torch.Generator().manual_seed(2))
    zero = sample(OracleModel(), _action_seq(50, 4), steps=20, noise=noise, method="euler_maruyama", sde_scale=0.0)
    assert not torch.allclose(ode.x, sde.x, atol=1e-2)
    assert torch.allclose(ode.x, zero.x, atol=1e-5)  # c = 0 is the ODE


def test_conditioning_tokens_are_kept_and_absent_tokens_are_noise():
    b, n = 6, 5
    x = torch.randn(b, n, 4)
    tau = torch.zeros(b, n)
    tau[:, 1] = 1.0  # token 1 absent
    loss_mask = torch.zeros(b, n, dtype=torch.bool)
    loss_mask[:, 2:] = True  # tokens 2..4 sampled; token 0 clean context
    layout = (("image", 2), ("action", 3))
    seq = TokenSequence(x=x, tau=tau, pos=torch.zeros(n, 3), layout=layout, loss_mask=loss_mask)
    noise = torch.randn(b, n, 4, generator=torch.Generator().manual_seed(3))
    model = OracleModel()
    out = sample(model, seq, steps=4, noise=noise)
    assert len(model.calls) == 4
    times = [1.0, 0.75, 0.5, 0.25]
    for call, t in zip(model.calls, times):
        assert torch.equal(call.x[:, 0], x[:, 0]) and (call.tau[:, 0] == 0).all()  # clean context untouched
        assert torch.equal(call.x[:, 1], noise[:, 1]) and (call.tau[:, 1] == 1).all()  # absent = pure noise
        assert torch.allclose(call.tau[:, 2:], torch.tensor(t))
        assert call.time_levels.shape == (b, 3)
        assert (call.x[:, 2:, 2:] == 0).all()  # action padding channels stay zero
    assert torch.equal(model.calls[0].x[:, 2:, :2], noise[:, 2:, :2])
    assert torch.equal(out.x[:, :2], x[:, :2]) and torch.equal(out.tau[:, :2], tau[:, :2])
    assert (out.tau[:, 2:] == 0).all()


def test_guidance_formula_and_single_batched_forward():
    noise = torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(4))
    cond = _action_seq(8, 3)
    uncond = cond.with_values(cond.x, text=torch.zeros_like(cond.text))
    model = OracleModel()
    w = 3.0
    out = sample(model, cond, steps=1, guidance=w, uncond_seq=uncond, noise=noise)
    assert len(model.calls) == 1 and model.calls[0].x.shape[0] == 16  # both halves in one forward
    t1 = torch.ones(8, 3)
    v_c = gmm_velocity(noise, t1)
    v_u = gmm_velocity(noise, t1, means=MEANS + torch.tensor([0.0, -1.0]))
    assert torch.allclose(out.x, noise - (v_u + w * (v_c - v_u)), atol=1e-5)
    # Default unconditional (text None) cannot be stacked with text: two forwards, same formula.
    model = OracleModel()
    out2 = sample(model, cond, steps=1, guidance=w, noise=noise)
    assert len(model.calls) == 2 and model.calls[1].text is None
    assert torch.allclose(out2.x, out.x, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        sample(OracleModel(), _action_seq(2, 2), method="heun")
    with pytest.raises(ValueError, match="noise must have the shape"):
        sample(OracleModel(), _action_seq(2, 2), noise=torch.zeros(1, 2, 2))
