"""Demonstration shards -> RT-1-schema RLDS: resumable shards, frame fitting, and a real scripted collection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from envs.demos import (
    DemoEpisode,
    build_rlds,
    done_seeds,
    fit_frames,
    load_shard,
    save_failure,
    save_shard,
    to_rt1_episode,
)

TASK = "maniskill/push_cube"


def _fake_episode(seed: int, T: int = 4, hw=(64, 80)) -> DemoEpisode:
    rng = np.random.default_rng(seed)
    term = np.zeros(T, bool)
    term[-1] = True
    return DemoEpisode(TASK, seed, "push the blue cube onto the red and white target",
                       rng.integers(0, 255, (T, *hw, 3), dtype=np.uint8), rng.normal(size=(T, 3)).astype(np.float32),
                       rng.normal(size=(T, 3)).astype(np.float32), np.ones((T, 1), np.float32), term,
                       np.zeros((T, 7), np.float32))


def test_shards_are_atomic_and_resumable(tmp_path):
    d = tmp_path / "shards"
    ep = _fake_episode(3)
    save_shard(ep, d)
    save_failure(TASK, 5, "planner found no path", d)
    (d / ".maniskill_push_cube_0000007.123.tmp.npz").write_bytes(b"half written")  # an interrupted write
    assert done_seeds(TASK, d) == ([3], [5])
    back = load_shard(d / "maniskill_push_cube_0000003.npz")
    np.testing.assert_array_equal(back.frames, ep.frames)
    assert back.instruction == ep.instruction and back.seed == 3 and back.terminate[-1]


def test_fit_frames_resizes_and_pads():
    f = np.full((2, 64, 64, 3), 200, np.uint8)
    out = fit_frames(f)
    assert out.shape == (2, 256, 320, 3) and out.dtype == np.uint8
    assert out[:, :, :32].max() == 0 and out[:, :, 32:288].min() == 200  # 256x256 centred, 32 px bars
    same = np.zeros((1, 256, 320, 3), np.uint8)
    assert fit_frames(same) is same


def _read_back(version_dir: Path):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")
    from worldmodel.data.rt1_schema import check_rt1_schema

    builder = tfds.builder_from_directory(str(version_dir))
    check_rt1_schema(builder)
    return [ep for ep in tfds.as_numpy(builder.as_dataset(split="train"))]


@pytest.mark.needs_tf
def test_build_rlds_from_shards(tmp_path):
    d = tmp_path / "shards"
    for s in (0, 1):
        save_shard(_fake_episode(s, T=3 + s), d)
    ex = to_rt1_episode(_fake_episode(0))
    assert ex["frames"].shape == (4, 256, 320, 3)
    path = build_rlds(TASK, d, tmp_path / "rlds")
    assert not (tmp_path / "rlds.partial").exists()
    eps = _read_back(path)
    assert len(eps) == 2
    steps = list(eps[1]["steps"])
    assert len(steps) == 4 and steps[0]["is_first"] and steps[-1]["is_last"]
    assert steps[0]["observation"]["natural_language_instruction"].decode() == _fake_episode(0).instruction
    assert steps[-1]["action"]["terminate_episode"].tolist() == [1, 0, 0]
    assert steps[0]["action"]["terminate_episode"].tolist() == [0, 1, 0]
    from worldmodel.data.rt1_reader import RT1Windows  # the reader fine-tuning uses

    windows = list(RT1Windows(path, split="train", height=32, width=40, eval_fraction=0.0, shuffle_buffer=0))
    assert len(windows) == 3 + 4  # one window per step
    assert {w["instruction"] for w in windows} == {_fake_episode(0).instruction}
    assert windows[0]["context"].shape == (2, 3, 32, 40)


@pytest.mark.slow
@pytest.mark.needs_tf
@pytest.mark.needs_sim
@pytest.mark.timeout(150)
def test_collect_demos_script_writes_a_readable_dataset(tmp_path, renderer, load_script):
    """Two real scripted episodes (push_cube) through the command line, then a restart that has nothing to do."""
    collect_demos = load_script("collect_demos")

    out = tmp_path / "demos"
    args = ["--task", TASK, "--episodes", "2", "--workers", "1", "--out", str(out), "--no-progress"]
    assert collect_demos.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 2, summary
    eps = _read_back(Path(summary["rlds_dir"]))
    assert len(eps) == 2
    steps = list(eps[0]["steps"])
    assert steps[0]["observation"]["image"].shape == (256, 320, 3)
    assert steps[0]["observation"]["natural_language_instruction"].decode() == \
        "push the blue cube onto the red and white target"
    wv = np.stack([s["action"]["world_vector"] for s in steps])
    assert np.abs(wv).max() <= 0.1 + 1e-6 and np.abs(wv).max() > 1e-3  # metres within the controller's bound
    # restart: everything is already there, no seed is attempted again
    assert collect_demos.main(args + ["--no-build"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["resumed_kept"] == 2 and again["attempts"] == 2 + again["resumed_failed"]
