"""The video-action mode mixture: the right tokens are clean, noised, absent or left out in each mode."""

import pytest
import torch

from worldmodel.action_modes import (
    ACTION_TOKEN_DIM,
    MODES,
    WindowLayout,
    action_tokens,
    build_sequence,
    draw_mode,
    split_action_tokens,
)
from worldmodel.codecs import PatchCodec
from worldmodel.selfflow import SelfFlowConfig, dual_timestep
from worldmodel.sizes import build_model

GEOM = WindowLayout(context_frames=2, future_frames=2, frame_stride=3, horizon=4)
B, H, W = 3, 8, 8  # 4 patches of 4x4 per frame


def window():
    g = torch.Generator().manual_seed(0)
    context = torch.rand(B, 2, 3, H, W, generator=g) * 2 - 1
    future = torch.rand(B, 2, 3, H, W, generator=g) * 2 - 1
    actions = torch.rand(B, 4, 7, generator=g) * 2 - 1
    terminate = torch.zeros(B, 4)
    terminate[:, -1] = 1
    valid = torch.ones(B, 4, dtype=torch.bool)
    valid[0, 2:] = False  # the first window runs past its episode's end
    return context, future, actions, terminate, valid


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_marks_the_right_tokens(mode):
    context, future, actions, terminate, valid = window()
    seq = build_sequence(mode, PatchCodec(4), context, future, actions, terminate, valid, GEOM)
    n_ctx, n_fut, n_act = 8, 8, 4
    if mode == "policy":
        assert seq.layout == (("video", n_ctx), ("action", n_act))  # no future frames at all
        ctx, act = slice(0, n_ctx), slice(n_ctx, n_ctx + n_act)
        fut = None
    else:
        assert seq.layout == (("video", n_ctx + n_fut), ("action", n_act))
        ctx, fut, act = slice(0, n_ctx), slice(n_ctx, n_ctx + n_fut), slice(n_ctx + n_fut, n_ctx + n_fut + n_act)
    # context frames are always clean conditioning, never trained
    assert torch.all(seq.tau[:, ctx] == 0) and not seq.loss_mask[:, ctx].any()
    expect_act_trained = mode in ("policy", "joint")
    assert torch.equal(seq.loss_mask[:, act], valid if expect_act_trained else torch.zeros_like(valid))
    # actions past the episode's end are absent (tau 1) in every mode; real ones clean or sampled from noise
    assert torch.equal(seq.tau[:, act], torch.ones_like(seq.tau[:, act]) if mode == "video" else (~valid).float())
    if fut is not None:
        assert seq.loss_mask[:, fut].all()  # future frames noised in joint / dynamics / video
    # the action tokens hold the 7 normalized dims and terminate as -1 / +1
    assert seq.x.shape[-1] == 48
    assert torch.allclose(seq.x[:, act, :7], actions)
    assert torch.equal(seq.x[:, act, 7], terminate * 2 - 1)


def test_positions_share_one_time_axis():
    context, future, actions, terminate, valid = window()
    seq = build_sequence("joint", PatchCodec(4), context, future, actions, terminate, valid, GEOM)
    t = seq.pos[:, 0]
    assert t[:4].unique().tolist() == [-3.0] and t[4:8].unique().tolist() == [0.0]  # context at offsets -3, 0
    assert t[8:12].unique().tolist() == [3.0] and t[12:16].unique().tolist() == [6.0]  # future at +3, +6
    assert t[16:].tolist() == [0.0, 1.0, 2.0, 3.0]  # action i acts from the frame at step i


def test_objective_noises_only_the_mode_tokens():
    context, future, actions, terminate, valid = window()
    seq = build_sequence("dynamics", PatchCodec(4), context, future, actions, terminate, valid, GEOM)
    dual = dual_timestep(seq, SelfFlowConfig(), torch.Generator().manual_seed(1))
    act = slice(16, 20)
    assert torch.equal(dual.tau_student[:, act], (~valid).float())  # clean actions; absent past the end
    assert torch.all(dual.tau_student[:, :8] == 0)
    assert torch.all(dual.tau_student[:, 8:16] > 0)


def test_a_tiny_model_trains_on_every_mode():
    model = build_model("tiny", token_dim={"video": 48, "action": ACTION_TOKEN_DIM})
    context, future, actions, terminate, valid = window()
    for mode in MODES:
        seq = build_sequence(mode, PatchCodec(4), context, future, actions, terminate, valid, GEOM)
        out = model(seq)
        assert out.velocity.shape == seq.x.shape


def test_action_token_round_trip_and_mode_draws():
    actions, terminate = torch.rand(2, 4, 7), torch.tensor([[0, 0, 1, 0], [1, 1, 0, 0]]).float()
    back, term = split_action_tokens(action_tokens(actions, terminate))
    assert torch.allclose(back, actions) and torch.equal(term, terminate)
    g = torch.Generator().manual_seed(0)
    draws = [draw_mode({"policy": 0.75, "video": 0.25}, g) for _ in range(2000)]
    assert abs(draws.count("policy") / 2000 - 0.75) < 0.04 and set(draws) == {"policy", "video"}
    with pytest.raises(ValueError, match="unknown training mode"):
        draw_mode({"polcy": 1.0}, g)
    with pytest.raises(ValueError, match="future frames"):
        build_sequence("joint", PatchCodec(4), *window()[:1], None, *window()[2:], GEOM)
