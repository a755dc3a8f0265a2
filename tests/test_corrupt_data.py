"""Corrupt TFRecord data: exactly the bad records are skipped and counted, and statistics follow the data."""

from __future__ import annotations

import struct

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from worldmodel.actions import compute_action_stats, load_or_compute_stats, rt1_action, stats_from_actions  # noqa: E402
from worldmodel.data.rt1_reader import RT1Windows, split_episodes  # noqa: E402
from worldmodel.data.rt1_synthetic import make_synthetic_episodes  # noqa: E402
from worldmodel.data.rt1_writer import write_rt1_dataset  # noqa: E402
from worldmodel.data.tfrecords import CorruptRecords, masked_crc32c, verified_records  # noqa: E402

N = 8
BAD = 4


def _episodes(seed=0, n=N):
    eps = make_synthetic_episodes(n, steps=6, seed=seed, blocks=1)
    for ep in eps:
        ep.pop("target_rc")
    return eps


def _record_offsets(path) -> list[int]:
    data, offsets, offset = path.read_bytes(), [], 0
    while offset < len(data):
        offsets.append(offset)
        offset += 12 + struct.unpack("<Q", data[offset: offset + 8])[0] + 4
    return offsets


def _flip(path, at: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _shard(version_dir):
    (shard,) = sorted(version_dir.glob("*.tfrecord*"))
    return shard


@pytest.fixture()
def episodes():
    return _episodes()


@pytest.fixture()
def data(tmp_path, episodes):
    return write_rt1_dataset(episodes, tmp_path / "data")


def test_crc32c_matches_the_files_tensorflow_writes(data):
    raw = _shard(data).read_bytes()
    assert struct.unpack("<I", raw[8:12])[0] == masked_crc32c(raw[:8])


@pytest.mark.parametrize("where", ["data", "header"])
def test_one_corrupt_record_loses_exactly_its_episode(data, episodes, where):
    shard = _shard(data)
    offsets = _record_offsets(shard)
    assert len(offsets) == N
    _flip(shard, offsets[BAD] + (200 if where == "data" else 0))  # 16 bytes inside record 3 (or its length)
    reader = RT1Windows(data, split="all", shuffle_buffer=0, horizon=1)
    with pytest.warns(UserWarning, match=rf"skipped 1 episode.*1 with a corrupt record.*1 in {shard}"):
        samples = list(reader)
    assert reader.skipped == 1 and reader.skipped_episodes == [BAD]
    seen = sorted({s["episode_index"] for s in samples})
    assert seen == [i for i in range(N) if i != BAD]
    for s in samples:  # indices stay exact after the bad record: each window's action is its episode's
        expected = rt1_action(episodes[s["episode_index"]]["actions"])[s["step"]]
        np.testing.assert_allclose(s["actions_raw"][0].numpy(), expected, atol=1e-6)


def test_verified_records_counts_a_truncated_tail(data):
    shard = _shard(data)
    offsets = _record_offsets(shard)
    shard.write_bytes(shard.read_bytes()[: offsets[-1] + 40])  # the last record cut short
    corrupt = CorruptRecords()
    positions = [p for p, _ in verified_records(shard, N, corrupt, start=100)]
    assert positions == [100 + i for i in range(N - 1)]
    assert corrupt.per_file == {str(shard): [100 + N - 1]}


def test_action_stats_skip_the_same_records_as_training(data, episodes):
    _flip(_shard(data), _record_offsets(_shard(data))[BAD] + 200)
    train = [i for i in split_episodes(N, "train", 0.2) if i != BAD]
    assert len(train) < len(split_episodes(N, "train", 0.2))  # the bad episode is a training one
    expected = stats_from_actions(np.concatenate([rt1_action(episodes[i]["actions"]) for i in train]))
    with pytest.warns(UserWarning, match="skipped 1 training episode"):
        stats = compute_action_stats(data, eval_fraction=0.2)
    assert stats.num_steps == expected.num_steps
    np.testing.assert_allclose(stats.q99, expected.q99, atol=1e-6)


def test_changed_dataset_recomputes_cached_stats(tmp_path, data, episodes):
    first = load_or_compute_stats(data, cache_dir=tmp_path / "cache", eval_fraction=0.2)
    assert load_or_compute_stats(data, cache_dir=tmp_path / "cache", eval_fraction=0.2).num_steps == first.num_steps
    # the same directory rewritten with other episodes; the stats file beside the data is kept (a copy over it)
    stale = (data / "action_stats_train_ef0.2.json").read_text()
    other = _episodes(seed=5, n=N + 2)
    write_rt1_dataset(other, tmp_path / "data", overwrite=True)
    (data / "action_stats_train_ef0.2.json").write_text(stale)
    train = split_episodes(N + 2, "train", 0.2)
    expected = stats_from_actions(np.concatenate([rt1_action(other[i]["actions"]) for i in train]))
    again = load_or_compute_stats(data, cache_dir=tmp_path / "cache", eval_fraction=0.2)
    assert again.num_steps == expected.num_steps != first.num_steps
    np.testing.assert_allclose(again.q99, expected.q99, atol=1e-6)
    # bytes edited in place (same size, same shard lengths): recomputed too
    _flip(_shard(data), _record_offsets(_shard(data))[BAD] + 200)
    with pytest.warns(UserWarning, match="skipped 1 training episode"):
        edited = load_or_compute_stats(data, cache_dir=tmp_path / "cache", eval_fraction=0.2)
    assert edited.num_steps < again.num_steps


def test_reading_undoes_tf_datas_malloc_patch(data, monkeypatch):
    """from_generator sets M_TRIM_THRESHOLD=128 KiB process-wide (CPU training ran 2x slower); each file's first
    record puts glibc's thresholds back."""
    import sys

    from worldmodel.data import tfrecords

    calls = []
    monkeypatch.setattr(tfrecords, "restore_malloc_thresholds", lambda: calls.append(1) or True)
    windows = RT1Windows(data, height=8, width=10, context_frames=1, future_frames=0, horizon=2, shuffle_buffer=0)
    next(iter(windows))
    assert calls, "the record generator never restored the malloc thresholds"
    monkeypatch.undo()
    if sys.platform.startswith("linux"):
        assert tfrecords.restore_malloc_thresholds() is True  # glibc's mallopt accepted both values
