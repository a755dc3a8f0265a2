"""Training and inference agree: sampler clocks per modality, absent actions past an episode's end, the
context every policy entry point presents, and proprioception from the writer to the policy."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from policies.selfflow_policy import SelfFlowPolicy
from worldmodel.action_modes import ACTION_TOKEN_DIM, MODES, WindowLayout, build_sequence
from worldmodel.actions import ActionNormalizer
from worldmodel.builders import build_frames_codec, build_text
from worldmodel.config import compose
from worldmodel.sampling import sample, visited_times
from worldmodel.selfflow import SelfFlowConfig, SelfFlowObjective, dual_timestep
from worldmodel.sizes import build_model
from worldmodel.state import STATE_DIM, StateNormalizer
from worldmodel.timesteps import TimestepDistribution, shift_time, shifted_schedule

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SHIFT = {"action": 7.4}  # what configs/finetune_rt1.yaml trains actions with


def _codec():
    return build_frames_codec(OmegaConf.create({"frames": "patch", "patch": 8, "frames_path": None}))


def _model(codec, text_dim=None):
    torch.manual_seed(0)
    return build_model("tiny", token_dim={"video": codec.token_dim, "action": ACTION_TOKEN_DIM, "state": STATE_DIM},
                       text_dim=text_dim or 64).eval()


class _TauSpy(torch.nn.Module):
    """Wraps a model; records the per-token times of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.taus = model, []
        self.token_dim = model.token_dim

    def forward(self, seq, **kw):
        self.taus.append(seq.tau.clone())
        return self.model(seq, **kw)


def _window(codec, mode, geometry, batch=2, valid=None, state=None):
    ctx = torch.rand(batch, geometry.context_frames, 3, 32, 40) * 2 - 1
    fut = torch.rand(batch, geometry.future_frames, 3, 32, 40) * 2 - 1
    acts = torch.rand(batch, geometry.horizon, 7) * 2 - 1
    valid = torch.ones(batch, geometry.horizon, dtype=torch.bool) if valid is None else valid
    return build_sequence(mode, codec, ctx, fut, acts, torch.zeros(batch, geometry.horizon), valid, geometry,
                          state=state)


@pytest.mark.parametrize("mode", ["policy", "joint"])
def test_sampler_visits_each_modality_at_its_trained_times(mode):
    codec = _codec()
    geometry = WindowLayout(2, 1, 1, 4)
    spy = _TauSpy(_model(codec))
    seq = _window(codec, mode, geometry)
    sample(spy, seq, steps=10, generator=torch.Generator().manual_seed(0), modality_shift=SHIFT)
    act = slice(seq.x.shape[1] - geometry.horizon, seq.x.shape[1])
    visited = torch.stack([tau[0, act] for tau in spy.taus])  # (steps, H)
    expected = visited_times(seq.layout, 10, modality_shift=SHIFT)["action"]  # (steps,)
    assert torch.allclose(visited, expected[:, None].expand_as(visited), atol=1e-6)
    assert torch.allclose(expected, shift_time(shifted_schedule(10)[:-1], 7.4))
    # Every visited action time is one the action head trained on: its training CDF there is not negligible.
    train = TimestepDistribution()  # logit-normal(0, 1) as configs/objective, then the action shift
    cdf = train.cdf(torch.tensor([float(unshifted) for unshifted in shifted_schedule(10)[1:-1]]))  # base clock
    assert float(cdf.min()) > 0.01  # the unshifted clock visits the base distribution's support ...
    action_cdf = train.cdf(torch.tensor([float(shift_time(t, 1 / 7.4)) for t in expected[1:]]))
    assert float(action_cdf.min()) > 0.01  # ... and the shifted clock the action's (t' = shift(t, 7.4))
    if mode == "joint":  # video and actions are paired as training pairs them: one base time, shifted per modality
        fut = slice(40, 60)  # 20 patch tokens per 32x40 frame at patch 8: two context frames, then the future
        for tau in spy.taus:
            assert torch.allclose(tau[0, act], shift_time(tau[0, fut][0], 7.4).expand(geometry.horizon), atol=1e-6)


def test_training_pairs_modalities_like_the_sampler():
    codec = _codec()
    seq = _window(codec, "joint", WindowLayout(1, 1, 1, 4), batch=64)
    dual = dual_timestep(seq, SelfFlowConfig(mask_ratio={"video": 0.0, "action": 0.0}, modality_shift=SHIFT),
                         torch.Generator().manual_seed(1))
    n = seq.x.shape[1]
    video_t = dual.tau_student[:, 20]  # the future frame's first token
    assert torch.allclose(dual.tau_student[:, n - 1], shift_time(video_t, 7.4), atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_actions_past_the_episode_end_are_absent(mode):
    codec = _codec()
    geometry = WindowLayout(1, 1, 1, 4)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    seq = _window(codec, mode, geometry, valid=valid)
    act = slice(seq.x.shape[1] - 4, seq.x.shape[1])
    assert torch.all(seq.tau[0, act][2:] == 1.0)  # absent (pure noise), never clean
    assert not seq.loss_mask[0, act][2:].any()
    if mode == "dynamics":
        assert torch.all(seq.tau[1, act] == 0.0)  # real actions stay clean conditioning


def test_offline_eval_samples_windows_as_the_policy_does(monkeypatch):
    import worldmodel.rt1_eval as rt1_eval
    from worldmodel.finetune import FinetuneTask

    codec = _codec()
    text = build_text(OmegaConf.create({"encoder": "byte", "dim": 64, "layers": 1, "max_len": 32})).eval()
    model = _model(codec, text.feature_dim)
    geometry = WindowLayout(1, 0, 1, 4)

    objective = SelfFlowObjective.for_model(model, SelfFlowConfig(modality_shift=SHIFT))
    task = FinetuneTask(model, objective, text, codec, None, geometry, {"policy": 1.0}, 0.0, seed=0)
    seen = []
    monkeypatch.setattr(rt1_eval, "sample", lambda m, seq, **kw: seen.append((seq, kw)) or seq)
    batch = {"context": torch.rand(1, 1, 3, 32, 40) * 2 - 1, "actions": torch.zeros(1, 4, 7),
             "terminate": torch.zeros(1, 4), "action_valid": torch.tensor([[True, False, False, False]]),
             "instruction": ["push"]}
    rt1_eval.predict_actions(model, task, batch, steps=2, seed=0)
    seq, kw = seen[0]
    assert seq.loss_mask[0, -4:].all() and torch.all(seq.tau[0, -4:] == 0)  # every slot sampled, as deployed
    assert kw["modality_shift"] == SHIFT


# ------------------------------------------------------------------------------------------------ context
def _policy(context_frames=3, frame_stride=2, state=False):
    run = OmegaConf.to_container(compose("finetune_rt1"))  # the composed recipe
    run.pop("hydra", None)
    run.pop("defaults", None)
    run["model"] = {"size": "tiny", "overrides": {}}
    run["text"].update(dim=64, layers=1, max_len=32)
    run["data"].update(context_frames=context_frames, frame_stride=frame_stride, state=state)
    run["objective"] = {"modality_shift": SHIFT}
    codec = build_frames_codec(OmegaConf.create(run["codec"]))
    text = build_text(OmegaConf.create(run["text"])).eval()
    normalizer = ActionNormalizer([-0.05] * 3 + [-0.2] * 3, [0.05] * 3 + [0.2] * 3)
    states = StateNormalizer([0.0] * 8, [1.0] * 8) if state else None
    return SelfFlowPolicy(_model(codec, text.feature_dim), text, codec, normalizer, run, sampling_steps=2, seed=0,
                          execute_steps=1, state_normalizer=states)


def _record_contexts(policy):
    seen, original = [], policy._sample_chunks  # every entry point samples through this batched call

    def spy(context, instructions, seeds, state=None):
        seen.append((context.clone(), None if state is None else state.clone()))
        return original(context, instructions, seeds, state)

    policy._sample_chunks = spy
    return seen


def test_every_entry_point_presents_the_trained_context():
    frames = [np.full((32, 40, 3), 20 * i, np.uint8) for i in range(7)]
    states = [np.full(8, 0.1 * i, np.float32) for i in range(7)]
    stepper = _policy(state=True)
    by_step = _record_contexts(stepper)
    stepper.reset("push")
    for f, s in zip(frames, states):
        stepper.step(f, state=s)
    batch = _policy(state=True)
    by_batch = _record_contexts(batch)
    for f, s in zip(frames, states):
        batch.select_action({"image": f[None], "instruction": ["push"], "state": s[None]})
    chunk = _policy(state=True)
    by_chunk = _record_contexts(chunk)
    for t in range(len(frames)):  # the history up to t, at the control rate
        chunk.predict_action_chunk({"image": np.stack(frames[: t + 1]), "instruction": "push",
                                    "state": np.stack(states[: t + 1])})
    assert len(by_step) == len(by_batch) == len(by_chunk) == len(frames)
    for (c1, s1), (c2, s2), (c3, s3) in zip(by_step, by_batch, by_chunk):
        assert torch.equal(c1, c2) and torch.equal(c1, c3)
        assert torch.equal(s1, s2) and torch.equal(s1, s3)
    # at t = 6 with stride 2 and 3 frames the context is frames 2, 4, 6; at t = 1 it is 0, 0, 1
    last = by_step[-1][0][0, :, 0, 0, 0]
    assert torch.allclose((last + 1) * 127.5, torch.tensor([40.0, 80.0, 120.0]), atol=1e-3)
    first = by_step[1][0][0, :, 0, 0, 0]
    assert torch.allclose((first + 1) * 127.5, torch.tensor([0.0, 0.0, 20.0]), atol=1e-3)


def test_state_policy_needs_state_and_checks_it():
    policy = _policy(state=True)
    policy.reset("push")
    with pytest.raises(ValueError, match="proprioception"):
        policy.step(np.zeros((32, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="8 finite floats"):
        policy.step(np.zeros((32, 40, 3), np.uint8), state=np.full(8, np.nan))


# ------------------------------------------------------------------------------------------ proprioception
@pytest.mark.needs_tf
def test_state_round_trip_writer_reader_checkpoint_policy(tmp_path):
    from envs.demos import DemoEpisode, to_rt1_episode
    from worldmodel.data.rt1_reader import RT1Windows, split_episodes
    from worldmodel.data.rt1_writer import write_rt1_dataset
    from worldmodel.state import load_or_compute_state_stats, stats_from_states

    rng = np.random.default_rng(0)
    demos = []
    for seed, steps in enumerate((7, 9, 6, 8)):
        state = rng.normal(size=(steps, 8)).astype(np.float32)
        demos.append(DemoEpisode("maniskill/push_cube", seed, "push the cube", rng.integers(0, 255, (steps, 32, 40, 3),
                                 dtype=np.uint8), rng.normal(size=(steps, 3)).astype(np.float32) * 0.01,
                                 np.zeros((steps, 3), np.float32), np.ones((steps, 1), np.float32),
                                 np.eye(steps, dtype=bool)[-1], np.zeros((steps, 7), np.float32), state))
    episodes = [to_rt1_episode(d) for d in demos]  # frames fitted to 256x320 as the collector writes them
    for ep, d in zip(episodes, demos):  # the collector writes RT-1's own fields
        assert np.array_equal(ep["observation"]["base_pose_tool_reached"], d.state[:, :7])
        assert np.array_equal(ep["observation"]["gripper_closed"], d.state[:, 7:])
    data = write_rt1_dataset(episodes, tmp_path / "rlds")
    geometry = WindowLayout(2, 0, 3, 2)
    windows = list(RT1Windows(data, split="all", height=32, width=40, context_frames=2, future_frames=0,
                              frame_stride=3, horizon=2, shuffle_buffer=0, eval_fraction=0.25, state=True))
    assert len(windows) == sum(len(d) for d in demos)
    for w in windows:  # the state read with each context frame, clamped to the episode start like the frames
        state = demos[w["episode_index"]].state
        picks = [max(w["step"] + o, 0) for o in geometry.context_offsets()]
        assert np.allclose(w["state_raw"].numpy(), state[picks]) and np.allclose(w["state"].numpy(), state[picks])
    stats = load_or_compute_state_stats(data, eval_fraction=0.25)
    train = split_episodes(len(demos), "train", 0.25)
    expected = stats_from_states(np.concatenate([demos[i].state for i in train]))
    assert np.allclose(stats.q01, expected.q01, atol=1e-6) and np.allclose(stats.q99, expected.q99, atol=1e-6)
    normalized = next(iter(RT1Windows(data, split="all", height=32, width=40, context_frames=2, future_frames=0,
                                      frame_stride=3, horizon=2, shuffle_buffer=0, eval_fraction=0.25, state=True,
                                      state_normalizer=stats)))
    assert np.allclose(normalized["state"].numpy(), stats.normalize(normalized["state_raw"].numpy()), atol=1e-6)

    policy = _policy(context_frames=2, frame_stride=3, state=True)
    policy.state_normalizer = stats
    loaded = SelfFlowPolicy.from_pretrained(policy.save_pretrained(tmp_path / "ckpt"), device="cpu", seed=0,
                                            sampling_steps=2)
    assert loaded.state_normalizer.to_dict() == stats.to_dict()
    image, state = np.zeros((32, 40, 3), np.uint8), demos[0].state[0]
    assert torch.allclose(loaded._states(state, 1), torch.as_tensor(stats.normalize(state[None].repeat(2, 0)))[None])
    obs = {"image": image, "instruction": "push the cube", "state": state, "seed": 3}
    assert np.array_equal(policy.predict_action_chunk(obs)["actions"], loaded.predict_action_chunk(obs)["actions"])
    other = {**obs, "state": state + 1.0}  # the state reaches the model: another state, other actions
    chunks = [loaded.predict_action_chunk(o)["actions"] for o in (obs, other)]
    assert not np.array_equal(*chunks)


def test_state_reaches_the_policy_through_the_server(tmp_path):
    from policies.client import RemotePolicy
    from policies.serve import PolicyServer

    ckpt = _policy(context_frames=2, frame_stride=2, state=True).save_pretrained(tmp_path / "ckpt")
    served = SelfFlowPolicy.from_pretrained(ckpt, device="cpu", sampling_steps=2)
    local = SelfFlowPolicy.from_pretrained(ckpt, device="cpu", sampling_steps=2, seed=5, execute_steps=1)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (4, 32, 40, 3), dtype=np.uint8)
    states = rng.normal(size=(4, 8)).astype(np.float32)
    with PolicyServer(served, "127.0.0.1", 0) as server:
        remote = RemotePolicy("127.0.0.1", server.port, seed=5, execute_steps=1, retry_until_up_s=5)
        try:
            remote.reset("push")
            local.reset("push")
            local.seed = None
            for i, (f, s) in enumerate(zip(frames, states)):  # request i is sampled with seed 5 + i on both sides
                local.seed = 5 + i
                r_raw, _ = remote.step(f, state=s)
                l_raw, _ = local.step(f, state=s)
                np.testing.assert_allclose(r_raw["world_vector"], l_raw["world_vector"], rtol=0, atol=1e-6)
            with pytest.raises(Exception, match="state"):
                remote.client.infer({"image": frames[0], "instruction": "push", "state": np.zeros(5, np.float32)})
        finally:
            remote.close()
