"""SelfFlowPolicy on a tiny random checkpoint: loading, reproducibility, conventions, chunking, errors, serving."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_doubles import INSTR, H, _count_chunks, _image, _make_policy

from policies.conventions import filter_gripper
from policies.selfflow_policy import KIND, SelfFlowPolicy

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def policy():
    return _make_policy(sampling_steps=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, policy):
    return policy.save_pretrained(tmp_path_factory.mktemp("policy") / "ckpt")


def test_save_load_round_trip_same_actions(policy, ckpt):
    assert json.loads((Path(ckpt) / "config.json").read_text())["kind"] == KIND
    loaded = SelfFlowPolicy.from_pretrained(ckpt, device="cpu", sampling_steps=2)
    obs = {"image": _image(), "instruction": INSTR, "seed": 7}
    a, b = policy.predict_action_chunk(obs), loaded.predict_action_chunk(obs)
    assert a["actions"].shape == (H, 7) and a["terminate"].shape == (H,)
    assert a["actions"].dtype == np.float32 and np.all(np.isfinite(a["actions"]))
    np.testing.assert_array_equal(a["actions"], b["actions"])
    np.testing.assert_array_equal(a["terminate"], b["terminate"])
    other = policy.predict_action_chunk({**obs, "seed": 8})["actions"]
    assert not np.array_equal(a["actions"], other), "a different seed must give different actions"
    assert loaded.metadata["horizon"] == H and loaded.metadata["model_size"] == "tiny"


def test_reproducible_under_manual_seed(policy):
    assert policy.seed is None
    obs = {"image": _image(), "instruction": INSTR}
    torch.manual_seed(123)
    a = policy.predict_action_chunk(obs)["actions"]
    torch.manual_seed(123)
    b = policy.predict_action_chunk(obs)["actions"]
    c = policy.predict_action_chunk(obs)["actions"]  # RNG advanced
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_step_action_conventions(policy):
    policy.reset(INSTR)
    torch.manual_seed(0)
    for _ in range(H + 1):
        raw, action = policy.step(_image())
        assert set(raw) == {"world_vector", "rotation_delta", "gripper", "terminate_episode"}
        assert set(action) == {"world_vector", "rot_axangle", "gripper", "terminate_episode"}
        np.testing.assert_allclose(action["world_vector"], raw["world_vector"])
        np.testing.assert_array_equal(action["rot_axangle"], raw["rotation_delta"])  # RT-1's pass-through
        assert action["gripper"].shape == (1,)
        assert action["gripper"][0] == filter_gripper(raw["gripper"][0])
        assert raw["terminate_episode"].shape == (1,) and action["terminate_episode"].shape == (1,)
        assert action["terminate_episode"][0] in (0.0, 1.0)
    # small gripper commands are zeroed (deadzone 0.01); large ones pass through
    chunk = np.zeros((H, 8))
    chunk[:, 3:6] = [0.1, -0.2, 0.3]
    chunk[:, 6] = [0.005, -0.009, 0.5, -1.0]
    chunk[1, 7] = 1.0
    original = policy._sample_chunk
    policy._sample_chunk = lambda *a, **k: chunk.copy()
    try:
        policy.reset(INSTR)
        out = [policy.step(_image()) for _ in range(H)]
    finally:
        policy._sample_chunk = original
    assert [a["gripper"][0] for _, a in out] == [0.0, 0.0, 0.5, -1.0]
    assert [r["gripper"][0] for r, _ in out] == pytest.approx([0.005, -0.009, 0.5, -1.0])
    assert [a["terminate_episode"][0] for _, a in out] == [0.0, 1.0, 0.0, 0.0]
    # SimplerEnv's RT-1 wrapper for the Google robot passes rotation_delta through unchanged as the axis-angle
    # rot_axangle (policies/conventions.py; the "rpy" conversion is tested per option in tests/test_conventions.py)
    np.testing.assert_allclose(out[0][1]["rot_axangle"], [0.1, -0.2, 0.3], atol=1e-12)


@pytest.mark.parametrize("k, steps, expected", [(None, 9, 3), (1, 3, 3), (2, 5, 3), (3, 6, 2)])
def test_execute_steps_requery(k, steps, expected):
    policy = _make_policy(sampling_steps=1, execute_steps=k, seed=0)
    calls = _count_chunks(policy)
    policy.reset(INSTR)
    for _ in range(steps):
        policy.step(_image(shape=(32, 40, 3)))
    assert len(calls) == expected  # k=None executes the whole chunk (H=4): 9 steps -> 3 queries


def test_new_instruction_replans_and_step_needs_instruction():
    policy = _make_policy(sampling_steps=1, seed=0)
    calls = _count_chunks(policy)
    policy.reset(INSTR)
    policy.step(_image(shape=(32, 40, 3)))
    policy.step(_image(shape=(32, 40, 3)), "open drawer")
    assert len(calls) == 2
    policy.reset()
    with pytest.raises(ValueError, match="instruction"):
        policy.step(_image(shape=(32, 40, 3)))


def test_ensemble_queries_every_step_and_averages():
    policy = _make_policy(sampling_steps=1, ensemble=True)
    calls = _count_chunks(policy)
    policy.reset(INSTR)
    torch.manual_seed(0)
    actions = [policy.step(_image(shape=(32, 40, 3), seed=i))[0] for i in range(3)]
    assert len(calls) == 3
    for raw in actions:
        assert np.all(np.isfinite(raw["world_vector"])) and raw["terminate_episode"].shape == (1,)
    with pytest.raises(ValueError, match="either"):
        _make_policy(ensemble=True, execute_steps=2)


@pytest.mark.parametrize("image, match", [
    (np.random.default_rng(0).random((64, 64, 3)), "uint8"),
    (np.zeros((64, 64, 4), np.uint8), r"\(H, W, 3\)"),
    (np.zeros((64, 64), np.uint8), r"\(H, W, 3\)"),
    (np.full((64, 64, 3), np.nan, np.float32), "NaN"),
    ([[0, 1, 2]], "numpy array|dtype int64"),  # step() turns lists into arrays first
])
def test_bad_images_raise(policy, image, match):
    with pytest.raises(ValueError, match=match):
        policy.predict_action_chunk({"image": image, "instruction": INSTR, "seed": 0})
    policy.reset(INSTR)
    with pytest.raises(ValueError, match=match):
        policy.step(image)


@pytest.mark.parametrize("obs", [{"image": np.zeros((32, 40, 3), np.uint8)},
                                 {"image": np.zeros((32, 40, 3), np.uint8), "instruction": "  "},
                                 {"image": np.zeros((32, 40, 3), np.uint8), "instruction": None}])
def test_missing_instruction_raises(policy, obs):
    with pytest.raises(ValueError, match="instruction"):
        policy.predict_action_chunk(obs)


def test_wrong_checkpoint_kind_and_missing_dir(tmp_path, ckpt):
    other = tmp_path / "pretrain"
    other.mkdir()
    for f in Path(ckpt).iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["kind"] = "worldmodel.pretrain"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="worldmodel.pretrain"):
        SelfFlowPolicy.from_pretrained(other, device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        SelfFlowPolicy.from_pretrained(tmp_path / "nowhere", device="cpu")
    (other / "config.json").write_text(json.dumps({**config, "kind": KIND}))
    (other / "action_stats.json").unlink()
    with pytest.raises(ValueError, match="action_stats"):
        SelfFlowPolicy.from_pretrained(other, device="cpu")


@pytest.mark.parametrize("shape", [(512, 640, 3), (100, 100, 3), (32, 40, 3), (2, 20, 30, 3)])
def test_any_image_size(policy, shape):
    out = policy.predict_action_chunk({"image": _image(shape), "instruction": INSTR, "seed": 1})
    assert out["actions"].shape == (H, 7) and np.all(np.isfinite(out["actions"]))


def test_imagine_returns_frames(policy):
    tf = policy.geometry.future_frames
    frames = policy.imagine(_image((100, 120, 3)), INSTR, steps=2)
    assert frames.shape == (tf, policy.height, policy.width, 3) and frames.dtype == np.uint8
    given = policy.imagine(_image((100, 120, 3)), INSTR, actions=np.zeros((H, 7)), steps=2)
    assert given.shape == frames.shape
    with pytest.raises(ValueError, match="actions"):
        policy.imagine(_image((100, 120, 3)), INSTR, actions=np.zeros((H + 1, 7)), steps=2)


def test_select_action_batches():
    policy = _make_policy(sampling_steps=1, execute_steps=2, seed=0)
    calls = _count_chunks(policy)
    batch = {"image": np.stack([_image((48, 64, 3), seed=i) for i in range(3)]), "instruction": [INSTR] * 3}
    first = policy.select_action(batch)
    assert first.shape == (3, 7) and np.all(np.isfinite(first))
    policy.select_action(batch)
    assert calls == [3]  # one batched sampling call for the 3 rows, 2 actions executed from each
    policy.select_action({**batch, "instruction": INSTR})
    assert calls == [3, 3]
    with pytest.raises(ValueError, match="instruction"):
        policy.select_action({**batch, "instruction": [INSTR] * 2})


def test_server_and_remote_policy_match_in_process(ckpt):
    from policies.client import PolicyClient, RemotePolicy
    from policies.serve import PolicyServer

    served = SelfFlowPolicy.from_pretrained(ckpt, device="cpu", sampling_steps=2)
    local = SelfFlowPolicy.from_pretrained(ckpt, device="cpu", sampling_steps=2, seed=5)
    image = _image((64, 80, 3))
    with PolicyServer(served, "127.0.0.1", 0) as server:
        with PolicyClient("127.0.0.1", server.port, retry_until_up_s=5) as client:
            assert client.metadata["model_kind"] == KIND and client.metadata["horizon"] == H
            reply = client.infer({"image": image, "instruction": INSTR, "seed": 5})
            expected = local.predict_action_chunk({"image": image, "instruction": INSTR})
            np.testing.assert_allclose(reply["actions"], expected["actions"], rtol=0, atol=1e-6)
            np.testing.assert_array_equal(reply["terminate"], expected["terminate"])
        remote = RemotePolicy("127.0.0.1", server.port, seed=5, retry_until_up_s=5)
        try:
            remote.reset(INSTR)
            local.reset(INSTR)
            for _ in range(H):  # the whole first chunk (seed 5 on both sides)
                r_raw, r_act = remote.step(image)
                l_raw, l_act = local.step(image)
                for key in r_act:
                    np.testing.assert_allclose(r_act[key], l_act[key], rtol=0, atol=1e-6)
                np.testing.assert_allclose(r_raw["rotation_delta"], l_raw["rotation_delta"], rtol=0, atol=1e-6)
            assert remote.n_requests == 1
        finally:
            remote.close()


def test_reseed_makes_episodes_reproducible(policy):
    """The evaluator reseeds per episode: the same episode seed gives the same actions, another seed others."""
    image = np.full((64, 80, 3), 90, np.uint8)

    def episode(seed):
        policy.reset(INSTR)
        policy.reseed(seed)
        return np.stack([policy.step(image)[0]["world_vector"] for _ in range(6)])

    assert np.array_equal(episode(3), episode(3))
    assert not np.array_equal(episode(3), episode(4))
