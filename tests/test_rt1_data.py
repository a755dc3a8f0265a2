"""RT-1 data: schema round trip, offline writer, reader windows, splits, sharding, errors, synthetic sample."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from worldmodel.data.rt1_reader import RT1Windows, collate_rt1, shard_plan, split_episodes
from worldmodel.data.rt1_schema import check_rt1_schema, flatten_features, rt1_features
from worldmodel.data.rt1_synthetic import (
    COLORS,
    SPEED_PX,
    ensure_embedded_sample,
    make_synthetic_episodes,
    world_delta_to_pixels,
)
from worldmodel.data.rt1_writer import encode_jpeg, write_rt1_dataset

pytestmark = pytest.mark.needs_tf  # RLDS reading and writing (TensorFlow, tensorflow_datasets)
N_EPISODES = 6


@pytest.fixture(scope="module")
def episodes():
    return make_synthetic_episodes(N_EPISODES, steps=16, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, episodes):
    out = tmp_path_factory.mktemp("rt1")
    eps = [{k: v for k, v in ep.items() if k != "target_rc"} for ep in episodes]
    return write_rt1_dataset(eps, out)


def windows(path, **kw) -> list[dict]:
    kw.setdefault("shuffle_buffer", 0)
    return list(RT1Windows(path, **kw))


def test_schema_round_trip(dataset, episodes):
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(dataset))
    assert flatten_features(builder.info.features) == flatten_features(rt1_features())
    check_rt1_schema(builder)
    assert builder.info.splits["train"].num_examples == N_EPISODES
    ep = next(iter(tfds.as_numpy(builder.as_dataset(split="train[:1]"))))  # record 0 = the first episode given
    steps = list(ep["steps"])
    assert len(steps) == len(episodes[0]["frames"])
    np.testing.assert_allclose(np.stack([s["action"]["world_vector"] for s in steps]),
                               episodes[0]["actions"]["world_vector"], atol=1e-6)
    assert steps[-1]["action"]["terminate_episode"].tolist() == [1, 0, 0]
    assert steps[0]["action"]["terminate_episode"].tolist() == [0, 1, 0]
    assert steps[0]["is_first"] and steps[-1]["is_last"] and steps[-1]["is_terminal"]
    assert steps[0]["observation"]["image"].shape == (256, 320, 3)
    assert set(ep["aspects"]) == {"already_success", "feasible", "has_aspects", "success", "undesirable"}


def test_writer_rejects_wrong_frame_size(tmp_path):
    ep = {"frames": np.zeros((2, 128, 160, 3), np.uint8), "instruction": "x",
          "actions": {"world_vector": np.zeros((2, 3)), "rotation_delta": np.zeros((2, 3)),
                      "gripper_closedness_action": np.zeros(2), "terminate_episode": np.array([0, 1])}}
    with pytest.raises(ValueError, match="256x320"):
        write_rt1_dataset([ep], tmp_path)


def test_reader_shapes_dtypes_ranges(dataset, episodes):
    samples = windows(dataset, split="all", height=24, width=30, context_frames=3, future_frames=2, horizon=5)
    assert len(samples) == sum(len(ep["frames"]) for ep in episodes)  # one window per step
    s = samples[0]
    assert s["context"].shape == (3, 3, 24, 30) and s["future"].shape == (2, 3, 24, 30)
    assert s["context"].dtype == torch.float32 and s["context"].min() >= -1 and s["context"].max() <= 1
    assert s["actions"].shape == (5, 7) and s["actions_raw"].shape == (5, 7)
    assert s["terminate"].dtype == torch.float32 and s["action_valid"].dtype == torch.bool
    assert s["frame_steps"].tolist() == [-2, -1, 0, 1, 2]
    assert s["instruction"].startswith("move the gripper to the")
    batch = collate_rt1(samples[:4])
    assert batch["context"].shape == (4, 3, 3, 24, 30) and batch["episode_index"].shape == (4,)
    assert isinstance(batch["instruction"], list) and len(batch["instruction"]) == 4


def test_window_boundaries(dataset, episodes):
    samples = windows(dataset, split="all", context_frames=2, future_frames=2, horizon=4)
    ep0 = [s for s in samples if s["episode_index"] == 0]
    T = len(episodes[0]["frames"])
    assert [s["step"] for s in ep0] == list(range(T))
    first, last = ep0[0], ep0[-1]
    torch.testing.assert_close(first["context"][0], first["context"][1])  # before the start: first frame repeats
    torch.testing.assert_close(last["future"][0], last["context"][-1])  # past the end: last frame repeats
    torch.testing.assert_close(last["future"][1], last["context"][-1])
    assert last["action_valid"].tolist() == [True, False, False, False]
    assert last["terminate"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert torch.all(last["actions_raw"][1:] == 0)
    second_last = ep0[-2]
    assert second_last["action_valid"].tolist() == [True, True, False, False]
    np.testing.assert_allclose(second_last["actions_raw"][:2, :3].numpy(),
                               episodes[0]["actions"]["world_vector"][-2:], atol=1e-6)
    assert not torch.equal(first["context"][1], first["future"][0])  # the gripper moved


def test_split_disjoint_and_covering(dataset):
    train = split_episodes(N_EPISODES, "train", 0.3)
    evals = split_episodes(N_EPISODES, "eval", 0.3)
    assert set(train).isdisjoint(evals) and sorted([*train, *evals]) == list(range(N_EPISODES))
    assert len(evals) == 2
    seen_train = {s["episode_index"] for s in windows(dataset, split="train", eval_fraction=0.3)}
    seen_eval = {s["episode_index"] for s in windows(dataset, split="eval", eval_fraction=0.3)}
    assert seen_train == set(train.tolist()) and seen_eval == set(evals.tolist())
    big = split_episodes(10_000, "eval", 0.1)
    assert len(big) == 1000 and np.array_equal(big, split_episodes(10_000, "eval", 0.1))


def test_sharding_partitions_episodes(dataset):
    parts = [{s["episode_index"] for s in windows(dataset, split="train", eval_fraction=0.2, rank=r, world_size=2)}
             for r in range(2)]
    assert parts[0] and parts[1] and parts[0].isdisjoint(parts[1])
    assert parts[0] | parts[1] == set(split_episodes(N_EPISODES, "train", 0.2).tolist())
    # many files: whole files go to readers
    lengths = [3, 4, 2, 5]
    selected = np.arange(14)
    plans = [shard_plan(lengths, selected, 2, i) for i in range(2)]
    assert plans[0][0] == [0, 2] and plans[1][0] == [1, 3]
    assert not np.any(plans[0][1] & plans[1][1]) and np.all(plans[0][1] | plans[1][1])


def test_shuffle_is_seeded(dataset):
    a = [(s["episode_index"], s["step"]) for s in windows(dataset, split="all", shuffle_buffer=50, seed=1)]
    b = [(s["episode_index"], s["step"]) for s in windows(dataset, split="all", shuffle_buffer=50, seed=1)]
    c = [(s["episode_index"], s["step"]) for s in windows(dataset, split="all", shuffle_buffer=50, seed=2)]
    assert a == b and a != c and sorted(a) == sorted(c)


def test_missing_dir_and_wrong_schema(tmp_path):
    import tensorflow_datasets as tfds

    with pytest.raises(FileNotFoundError, match="gs://gresearch/robotics/fractal20220817_data/0.1.0"):
        RT1Windows(tmp_path / "nowhere")
    features = tfds.features.FeaturesDict({"steps": tfds.features.Dataset({
        "observation": {"image": tfds.features.Image(shape=(64, 64, 3))},
        "action": {"world_vector": tfds.features.Tensor(shape=(2,), dtype=np.float32)},
    })})
    fake = types.SimpleNamespace(info=types.SimpleNamespace(features=features), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="missing steps/action/rotation_delta") as err:
        check_rt1_schema(fake)
    assert "steps/action/world_vector is float32[2], expected float32[3]" in str(err.value)
    assert "natural_language_instruction" in str(err.value)


def test_corrupt_frame_skipped_and_counted(tmp_path, episodes):
    good = {k: v for k, v in episodes[0].items() if k != "target_rc"}
    bad = dict(good, frames=[encode_jpeg(f) for f in good["frames"]])
    bad["frames"][2] = b"\xff\xd8 this is not a jpeg"
    path = write_rt1_dataset([good, bad, good], tmp_path)
    reader = RT1Windows(path, split="all", shuffle_buffer=0)
    with pytest.warns(UserWarning, match="skipped 1 episode"):
        samples = list(reader)
    assert reader.skipped == 1 and reader.skipped_episodes == [1]
    assert {s["episode_index"] for s in samples} == {0, 2}


def _gripper_centre(frame: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(frame.max(-1) < 40)  # the gripper is the only near-black thing
    return np.array([(rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2])


def test_synthetic_actions_follow_frames(episodes):
    for ep in episodes:
        frames, wv = ep["frames"], ep["actions"]["world_vector"]
        color = ep["instruction"].split()[-2]
        assert color in COLORS
        assert np.any(np.all(frames[0] == COLORS[color], -1))  # the named block is visible
        target = ep["target_rc"]
        moves, lengths = 0, []
        for t in range(len(frames) - 1):
            motion = _gripper_centre(frames[t + 1]) - _gripper_centre(frames[t])  # (row, col) pixels
            if wv[t, 2] == 0 and np.abs(wv[t, :2]).max() > 0:
                moves += 1
                np.testing.assert_allclose(motion, world_delta_to_pixels(wv[t]), atol=1.01)
                lengths.append(np.linalg.norm(world_delta_to_pixels(wv[t])))
                if np.linalg.norm(motion) > 3:  # (sub-pixel moves round away in the rendering)
                    to_target = target - _gripper_centre(frames[t])
                    assert np.dot(motion, to_target) > 0  # moves toward the named block
        assert moves >= 4
        assert np.all(np.abs(np.array(lengths[:-1]) - SPEED_PX) < 5)  # constant speed until the last move
        assert ep["actions"]["gripper_closedness_action"][-2, 0] == 1.0  # closes once there
        assert ep["actions"]["terminate_episode"][-1] and not ep["actions"]["terminate_episode"][:-1].any()
        assert 6 <= len(frames) <= 16


def test_synthetic_block_count():
    for blocks in (1, 4):
        ep = make_synthetic_episodes(2, steps=16, seed=0, blocks=blocks)[0]
        drawn = [c for c, rgb in COLORS.items() if np.any(np.all(ep["frames"][0] == rgb, -1))]
        assert len(drawn) == blocks and ep["instruction"].split()[-2] in drawn
    with pytest.raises(ValueError, match="blocks must be between 1 and 4"):
        make_synthetic_episodes(1, blocks=5)


def test_embedded_sample_cached(tmp_path, capsys):
    path = ensure_embedded_sample(tmp_path, num_episodes=3, steps=12)
    assert "NOT RT-1" in capsys.readouterr().err
    assert (path / "dataset_info.json").exists()
    stamp = (path / "dataset_info.json").stat().st_mtime
    assert ensure_embedded_sample(tmp_path, num_episodes=3, steps=12, quiet=True) == path
    assert (path / "dataset_info.json").stat().st_mtime == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.parent.parent.name]  # no temporary leftovers
    assert len(windows(path, split="all")) > 0
