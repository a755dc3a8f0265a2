"""The MMDiT backbone: per-token time paths agree, text padding is inert, hidden states, sizes, errors."""

from __future__ import annotations

import json

import pytest
import torch

from worldmodel import MODEL_SIZES, TokenSequence, WorldModel, build_model, build_model_from_config
from worldmodel.sizes import model_config_from_json
from worldmodel.tokens import channel_mask

ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> WorldModel:
    torch.manual_seed(0)
    return build_model("tiny").eval()


def make_seq(batch=2, layout=(("image", 12),), channels=48, text_len=5, seed=0, tau=None) -> TokenSequence:
    g = torch.Generator().manual_seed(seed)
    n = sum(c for _, c in layout)
    x = torch.randn(batch, n, channels, generator=g)
    dims = {"image": 48, "video": 48, "audio": 64, "action": 7, "state": 8}
    x = x * channel_mask(layout, dims, channels)  # zero padding, as the packer writes it
    tau = torch.rand(batch, n, generator=g) if tau is None else tau
    pos = torch.randint(0, 4, (n, 3), generator=g).float()
    text = torch.randn(batch, text_len, 256, generator=g) if text_len else None
    text_mask = torch.ones(batch, text_len, dtype=torch.bool) if text_len else None
    return TokenSequence(x=x, tau=tau, pos=pos, layout=tuple(layout), loss_mask=torch.ones(batch, n, dtype=torch.bool),
                         text=text, text_mask=text_mask)


def levels_of(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factorise (B, N) times into (B, K) levels and (B, N) indices (test helper; host syncs are fine here)."""
    levels, index = [], []
    for row in tau:
        uniq, inv = torch.unique(row, return_inverse=True)
        levels.append(uniq)
        index.append(inv)
    k = max(len(u) for u in levels)
    levels = torch.stack([torch.cat([u, u[-1:].expand(k - len(u))]) for u in levels])  # pad with a repeat
    return levels, torch.stack(index)


def test_scalar_time_matches_level_path(model):
    seq = make_seq(tau=torch.full((2, 12), 0.37))
    per_token = model(seq).velocity
    level_seq = seq.with_values(seq.x, time_levels=torch.full((2, 1), 0.37), time_index=torch.zeros(2, 12).long())
    via_levels = model(level_seq).velocity
    assert per_token.shape == (2, 12, 48)
    torch.testing.assert_close(per_token, via_levels, atol=ATOL, rtol=1e-5)
    # a different time really changes the output (the time path is live)
    other = model(seq.with_values(seq.x, tau=torch.full((2, 12), 0.9))).velocity
    assert (other - per_token).abs().max() > 1e-4


def test_mixed_times_level_path_matches_per_token(model):
    g = torch.Generator().manual_seed(3)
    choices = torch.tensor([0.0, 0.25, 0.8, 1.0])
    tau = choices[torch.randint(0, 4, (2, 12), generator=g)]
    seq = make_seq(tau=tau)
    levels, index = levels_of(tau)
    assert torch.equal(levels.gather(1, index), tau)
    per_token = model(seq, return_hidden=(0, 3))
    via_levels = model(seq.with_values(seq.x, time_levels=levels, time_index=index), return_hidden=(0, 3))
    torch.testing.assert_close(per_token.velocity, via_levels.velocity, atol=ATOL, rtol=1e-5)
    for i in (0, 3):
        torch.testing.assert_close(per_token.hidden[i], via_levels.hidden[i], atol=ATOL, rtol=1e-5)


def test_per_token_time_is_per_token(model):
    """Changing one token's time changes that token's output."""
    seq = make_seq(text_len=0)
    base = model(seq).velocity
    tau = seq.tau.clone()
    tau[:, 3] = 1.0 - tau[:, 3]
    moved = model(seq.with_values(seq.x, tau=tau)).velocity
    assert (moved[:, 3] - base[:, 3]).abs().max() > 1e-4


def test_padded_text_is_ignored(model):
    seq = make_seq(text_len=5)
    ref = model(seq).velocity
    extra = torch.randn(2, 3, 256) * 5.0
    padded_text = torch.cat([seq.text, extra], dim=1)  # (B, 8, Dt)
    padded_mask = torch.cat([seq.text_mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    out = model(seq.with_values(seq.x, text=padded_text, text_mask=padded_mask)).velocity
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    # without the mask the extra tokens would matter: the mask is what removes them
    unmasked = model(seq.with_values(seq.x, text=padded_text, text_mask=None)).velocity
    assert (unmasked - ref).abs().max() > 1e-5
    # and the text itself conditions the output; None uses the learned null token
    uncond = model(seq.with_values(seq.x, text=None, text_mask=None)).velocity
    assert (uncond - ref).abs().max() > 1e-5


def test_hidden_states_and_stop_after(model):
    seq = make_seq(layout=(("video", 10), ("action", 4)))
    full = model(seq, return_hidden=range(model.num_blocks))
    assert model.num_blocks == 4 and model.hidden_size == 96
    assert sorted(full.hidden) == [0, 1, 2, 3]
    for h in full.hidden.values():
        assert h.shape == (2, 14, 96)
    for k in range(model.num_blocks):
        early = model(seq, return_hidden=(k,), stop_after=k)
        assert early.velocity is None
        assert sorted(early.hidden) == [k]
        torch.testing.assert_close(early.hidden[k], full.hidden[k], atol=0, rtol=0)
    with pytest.raises(ValueError, match="outside the blocks run"):
        model(seq, return_hidden=(3,), stop_after=1)
    with pytest.raises(ValueError, match="stop_after"):
        model(seq, stop_after=4)


def test_video_action_layout_pads_channels():
    torch.manual_seed(1)
    model = build_model("tiny")  # train mode: deterministic anyway (no dropout)
    layout = (("video", 10), ("action", 4), ("audio", 3))
    seq = make_seq(layout=layout, channels=64)
    out = model(seq).velocity
    assert out.shape == (2, 17, 64)
    assert torch.all(out[:, :10, 48:] == 0)  # video: 48 real channels
    assert torch.all(out[:, 10:14, 7:] == 0)  # action: 7 real channels
    assert out[:, :10, :48].abs().sum() > 0
    assert out[:, 10:14, :7].abs().sum() > 0 and out[:, 14:, :64].abs().sum() > 0
    # an action-only policy sequence with 7 channels runs too
    act = model(make_seq(layout=(("action", 5),), channels=7)).velocity
    assert act.shape == (2, 5, 7)


def test_every_parameter_gets_gradient():
    torch.manual_seed(2)
    model = build_model("tiny")
    cond = make_seq(layout=(("image", 6), ("video", 6), ("audio", 4), ("action", 3), ("state", 2)), channels=64)
    uncond = make_seq(layout=(("video", 6), ("action", 3)), channels=48, text_len=0, seed=1)
    loss = model(cond).velocity.square().mean() + model(uncond).velocity.square().mean()
    loss.backward()
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in params if p.grad is None or p.grad.abs().max() == 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_parameter_counts_on_meta_device():
    with torch.device("meta"):
        base = build_model("base")
        small = build_model("small")
    count = sum(p.numel() for p in base.parameters())
    assert abs(count - 619e6) / 619e6 < 0.03, count
    d = base.hidden_size
    projector = (d * 2 * d + 2 * d) + (2 * d * d + d)  # Self-Flow projector: Linear(D, 2D), GELU, Linear(2D, D)
    assert abs(count + projector - 625e6) / 625e6 < 0.03, count + projector
    assert base.num_blocks == 21 and d == 1152
    small_count = sum(p.numel() for p in small.parameters())
    assert 80e6 <= small_count <= 130e6, small_count
    # the modulation linears are a large share, as docs/ARCHITECTURE.md "Performance notes" says (27%)
    mod = sum(p.numel() for n, p in base.named_parameters() if ".mod." in n)
    assert 0.2 < mod / count < 0.35


def test_config_round_trip():
    torch.manual_seed(0)
    model = build_model("tiny", token_dim={"action": 10}, depth_single=1)
    config = json.loads(json.dumps(model.config))
    assert config["size"] == "tiny" and config["token_dim"]["action"] == 10 and config["depth_single"] == 1
    again = build_model(**config)
    assert again.config == model.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert build_model_from_config(json.dumps(config)).config == model.config
    assert model_config_from_json(config).token_dim["action"] == 10
    assert set(MODEL_SIZES) == {"tiny", "small", "base"}


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="valid sizes: tiny, small, base"):
        build_model("huge")
    with pytest.raises(ValueError, match="hiddn"):
        build_model("tiny", hiddn=128)
    with pytest.raises(ValueError, match="rope_axes"):
        build_model("tiny", hidden=128)
    with pytest.raises(ValueError, match="token_dim names unknown"):
        build_model("tiny", token_dim={"smell": 3})
    seq = make_seq(layout=(("image", 4),), channels=48)
    with pytest.raises(ValueError, match="'image' needs token_dim 48"):
        model(seq.with_values(seq.x[..., :40]))
    with pytest.raises(ValueError, match="text_dim"):
        model(seq.with_values(seq.x, text=torch.randn(2, 5, 32)))
