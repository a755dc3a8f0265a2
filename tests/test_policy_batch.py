"""Batched inference and LeRobot's batch conventions on a tiny random checkpoint."""

import numpy as np
import pytest
import torch
from policy_doubles import INSTR, H, _count_chunks, _image, _make_policy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def policy():
    return _make_policy(sampling_steps=2)


def _observations(n, **extra):
    return [{"image": _image((48, 64, 3), seed=i), "instruction": INSTR if i % 2 else "open the drawer", **extra}
            for i in range(n)]


def test_batched_chunk_is_one_call_equal_to_single_calls(policy):
    obs = [{**o, "seed": 100 + i} for i, o in enumerate(_observations(4))]
    obs[3]["image"] = np.stack([_image((30, 50, 3), seed=9), _image((30, 50, 3), seed=10)])  # (T, H, W, 3) frames
    calls = _count_chunks(policy)
    try:
        batched = policy.predict_action_chunk(obs)
        assert calls == [4]  # one sampling call for the 4 rows
        singles = [policy.predict_action_chunk(o) for o in obs]
    finally:
        del policy._sample_chunks
    assert len(batched) == 4
    for b, s in zip(batched, singles):
        assert b["actions"].shape == (H, 7) and b["terminate"].shape == (H,)
        np.testing.assert_allclose(b["actions"], s["actions"], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(b["terminate"], s["terminate"])
    assert not np.allclose(batched[0]["actions"], batched[2]["actions"])  # rows are not copies


def test_batched_without_seeds_draws_like_consecutive_single_calls(policy):
    obs = _observations(3)
    torch.manual_seed(5)
    batched = policy.predict_action_chunk(obs)
    torch.manual_seed(5)
    singles = [policy.predict_action_chunk(o) for o in obs]
    for b, s in zip(batched, singles):
        np.testing.assert_allclose(b["actions"], s["actions"], rtol=0, atol=1e-5)


def test_bad_row_refuses_the_batch_with_its_reason(policy):
    obs = _observations(3)
    obs[1]["instruction"] = ""
    with pytest.raises(ValueError, match="instruction"):
        policy.predict_action_chunk(obs)
    with pytest.raises(ValueError, match="at least one"):
        policy.predict_action_chunk([])


def _lerobot(images_uint8, tasks, camera="top", **extra):
    """(B, H, W, 3) uint8 -> LeRobot's (B, 3, H, W) float [0, 1] batch."""
    images = torch.as_tensor(np.asarray(images_uint8)).permute(0, 3, 1, 2).float() / 255
    return {f"observation.images.{camera}": images, "task": list(tasks), **extra}


def test_lerobot_predict_action_chunk_tensors_in_and_out(policy):
    images = np.stack([_image((48, 64, 3), seed=i) for i in range(3)])
    tasks = [INSTR, "open the drawer", INSTR]
    out = policy.predict_action_chunk(_lerobot(images, tasks, seed=[1, 2, 3]))
    assert isinstance(out, torch.Tensor) and out.shape == (3, H, 7) and out.dtype == torch.float32
    assert out.device == policy.device
    for i in range(3):  # the same as the toolkit's numpy form of row i
        ref = policy.predict_action_chunk({"image": images[i], "instruction": tasks[i], "seed": i + 1})
        np.testing.assert_allclose(out[i].numpy(), ref["actions"], rtol=0, atol=1e-5)


def test_lerobot_select_action_per_row_queues_and_reset():
    policy = _make_policy(sampling_steps=1, execute_steps=2, seed=0)
    calls = _count_chunks(policy)
    batch = _lerobot(np.stack([_image((48, 64, 3), seed=i) for i in range(2)]), [INSTR, "open the drawer"])
    first = policy.select_action(batch)
    assert isinstance(first, torch.Tensor) and first.shape == (2, 7) and first.device == policy.device
    second = policy.select_action(batch)
    assert calls == [2]  # one batched call filled both rows' queues; the second step pops
    assert not torch.equal(first, second)  # the second action of each chunk
    policy.select_action(batch)
    assert calls == [2, 2]  # queues empty again after execute_steps=2
    policy.reset()
    again = policy.select_action(batch)
    assert calls == [2, 2, 2]  # reset() dropped the rows' queues and histories
    torch.testing.assert_close(again, first)  # fixed seed, same first frame: the same first action


def test_lerobot_errors_name_the_expected_keys(policy):
    images = torch.rand(2, 3, 48, 64)
    with pytest.raises(ValueError, match="observation.images"):
        policy.select_action({"observation.state": torch.zeros(2, 8), "task": ["a", "b"]})
    with pytest.raises(ValueError, match="camera"):
        policy.predict_action_chunk({"observation.images.top": images, "observation.images.wrist": images,
                                     "task": ["a", "b"]})
    two = _make_policy(sampling_steps=1, camera="wrist")
    assert two.predict_action_chunk({"observation.images.top": images, "observation.images.wrist": images,
                                     "task": ["a", "b"]}).shape == (2, H, 7)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        policy.predict_action_chunk({"observation.images.top": images * 255, "task": ["a", "b"]})
    with pytest.raises(ValueError, match="float"):
        policy.predict_action_chunk({"observation.images.top": (images * 255).byte(), "task": ["a", "b"]})
    with pytest.raises(ValueError, match="task"):
        policy.predict_action_chunk({"observation.images.top": images, "task": ["a"]})
    with pytest.raises(ValueError, match="expected keys|LeRobot batch|'image'"):
        policy.select_action({"img": 1})
    with pytest.raises(ValueError, match="LeRobot"):
        policy.predict_action_chunk(42)
