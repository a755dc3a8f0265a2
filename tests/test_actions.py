"""Action assembly, quantile normalization (numpy + torch), JSON round trip, stats from a written dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from worldmodel.actions import (
    ActionNormalizer,
    load_or_compute_stats,
    rt1_action,
    stats_from_actions,
    terminate_flag,
)

Q01 = [-0.2245, -0.1482, -0.2316, -0.3518, -0.4193, -0.4364]
Q99 = [0.1782, 0.1494, 0.2184, 0.5893, 0.3527, 0.4480]


def test_rt1_action_and_terminate():
    action = {"world_vector": np.ones((4, 3)), "rotation_delta": np.full((4, 3), 2.0),
              "gripper_closedness_action": np.full((4, 1), -1.0)}
    a = rt1_action(action)
    assert a.shape == (4, 7) and a.dtype == np.float32 and a[0].tolist() == [1, 1, 1, 2, 2, 2, -1]
    assert terminate_flag(np.array([[0, 1, 0], [1, 0, 0]])).tolist() == [False, True]
    with pytest.raises(ValueError, match="one-hot"):
        terminate_flag(np.array([1, 0]))


def test_normalize_round_trip_numpy_and_torch():
    norm = ActionNormalizer(Q01, Q99)
    rng = np.random.default_rng(0)
    raw = rng.uniform(Q01 + [-1.0], Q99 + [1.0], size=(5, 4, 7)).astype(np.float32)  # (B, H, 7), inside the range
    n = norm.normalize(raw)
    assert n.shape == raw.shape and n.dtype == np.float32
    assert np.all(np.abs(n[..., :6]) <= 1) and np.array_equal(n[..., 6], raw[..., 6])  # gripper as is
    np.testing.assert_allclose(norm.unnormalize(n), raw, atol=1e-5)
    t = torch.from_numpy(raw).double()
    torch.testing.assert_close(norm.normalize(t), torch.from_numpy(n).double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.unnormalize(norm.normalize(t)), t, atol=1e-6, rtol=0)
    np.testing.assert_allclose(norm.normalize(np.array([Q01 + [0.5], Q99 + [0.5]]))[:, :6], [[-1] * 6, [1] * 6],
                               atol=1e-6)


def test_outliers_clip_and_constant_dims():
    norm = ActionNormalizer(Q01, Q99)
    far = np.array([[22.0, -22.0, 0, 0, 0, 0, 1.0]], np.float32)  # RT-1 has translations up to 22 m
    assert norm.normalize(far)[0, :2].tolist() == [1.0, -1.0]
    const = ActionNormalizer([0.0] * 6, [0.1, 0.1, 0.1, 0.0, 0.0, 0.0])  # rotation never varies
    x = np.array([[0.05, 0.05, 0.05, 0.3, 0.0, -0.3, 1.0]], np.float32)
    y = const.normalize(x)
    assert y[0, 3:6].tolist() == [0.0, 0.0, 0.0] and np.isfinite(y).all()
    assert const.unnormalize(y)[0, 3:6].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"\(\.\.\., 7\)"):
        norm.normalize(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="q99 >= q01"):
        ActionNormalizer(Q99, Q01)


def test_stats_use_quantiles_not_min_max():
    rng = np.random.default_rng(1)
    actions = rng.normal(0, 0.1, size=(20_000, 7))
    actions[0, 0] = 22.0  # one huge outlier
    stats = stats_from_actions(actions)
    assert stats.q99[0] < 0.3 and stats.num_steps == 20_000
    np.testing.assert_allclose(stats.q01, np.quantile(actions[:, :6], 0.01, axis=0))
    np.testing.assert_allclose(stats.mean, actions.mean(0))


def test_json_round_trip_and_strict_load():
    norm = ActionNormalizer(Q01, Q99, mean=np.arange(7) / 10, num_steps=42)
    back = ActionNormalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert np.array_equal(back.q01, norm.q01) and np.array_equal(back.mean, norm.mean) and back.num_steps == 42
    bad = norm.to_dict()
    del bad["q99"]
    with pytest.raises(ValueError, match="missing \\['q99'\\]"):
        ActionNormalizer.from_dict(bad)


@pytest.mark.slow
@pytest.mark.needs_tf
def test_stats_from_written_dataset(tmp_path, monkeypatch):
    from worldmodel.data.rt1_reader import split_episodes
    from worldmodel.data.rt1_synthetic import make_synthetic_episodes
    from worldmodel.data.rt1_writer import write_rt1_dataset

    episodes = make_synthetic_episodes(5, steps=12, seed=0)
    for ep in episodes:
        ep.pop("target_rc")
    path = write_rt1_dataset(episodes, tmp_path / "data")
    train = split_episodes(5, "train", 0.2)
    expected = stats_from_actions(np.concatenate([rt1_action(episodes[i]["actions"]) for i in train]))
    stats = load_or_compute_stats(path, cache_dir=tmp_path / "cache", eval_fraction=0.2)
    np.testing.assert_allclose(stats.q01, expected.q01, atol=1e-6)
    np.testing.assert_allclose(stats.q99, expected.q99, atol=1e-6)
    assert stats.num_steps == sum(len(episodes[i]["frames"]) for i in train)
    assert (path / "action_stats_train_ef0.2.json").exists()  # cached beside the data
    assert np.array_equal(load_or_compute_stats(path, eval_fraction=0.2).q99, stats.q99)
    # a read-only data directory: the stats go to the cache dir instead
    import worldmodel.actions as actions_mod

    monkeypatch.setattr(actions_mod, "_writable", lambda d: False)
    again = load_or_compute_stats(path, cache_dir=tmp_path / "cache", eval_fraction=0.5)
    assert list((tmp_path / "cache").glob("*_action_stats_train_ef0.5.json"))
    assert again.num_steps < stats.num_steps
