"""Windows of RT-1 episodes (context frames, future frames, an action chunk) from a local RLDS copy.

The dataset is opened with ``tfds.builder_from_directory`` (the version directory, e.g.
``/data/fractal20220817_data/0.1.0``), never by name: loading by name contacts cloud storage. One tf.data
pipeline does the work: the shard files are read record by record, each record (an episode) is parsed
with its images left encoded (``decoders={"steps": SkipDecoding()}``), its frames are decoded and resized
in parallel, and every step of it becomes a window. TensorFlow sees no GPU and has capped thread pools.

Episode index = record position in the ``train`` split (file order). The held-out split is a fixed,
deterministic set of episodes (the ``eval_fraction`` of them with the smallest hash of their index);
sharding over DDP ranks x DataLoader workers is by shard file when there are enough files, else by episode.
Records are read one by one with their checksums verified (worldmodel.data.tfrecords): a corrupt record loses
its own episode only. An episode whose record is corrupt or whose frames fail to decode is skipped and counted in
``.skipped`` (end of each pass; the warning names the count and the file of each corrupt record).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from worldmodel.data.rt1_schema import GCS_PATH, check_rt1_schema
from worldmodel.data.tfrecords import CorruptRecords, record_dataset, shard_starts

log = logging.getLogger(__name__)


def open_rt1_builder(dataset_dir: str | Path):
    """``tfds.builder_from_directory`` on a local RT-1-schema version directory, with clear errors."""
    from worldmodel.data.tfds_images import import_tf_quietly

    path = Path(dataset_dir).expanduser()
    if not (path / "dataset_info.json").exists():
        hint = ""
        if path.is_dir() and any(p.name[:1].isdigit() and p.is_dir() for p in path.iterdir()):
            hint = f" (it holds version folders: pass one of them, e.g. {path}/0.1.0)"
        raise FileNotFoundError(
            f"no RLDS dataset at {path}{hint}: expected the version directory holding dataset_info.json. "
            f"Copy {GCS_PATH} locally (gsutil -m cp -r {GCS_PATH} /data/fractal20220817_data/) and pass "
            "/data/fractal20220817_data/0.1.0, or leave data.rt1_dir unset to use the embedded synthetic sample."
        )
    _, tfds = import_tf_quietly()
    builder = tfds.builder_from_directory(str(path))
    check_rt1_schema(builder)
    return builder


def _episode_hash(index: int) -> int:
    return int(hashlib.sha1(f"rt1-episode-{index}".encode()).hexdigest()[:12], 16)


def split_episodes(num_episodes: int, split: str, eval_fraction: float) -> np.ndarray:
    """Sorted episode indices of ``split`` ("train" | "eval" | "all"): eval = the round(fraction * N) episodes
    (at least one when fraction > 0 and N > 1) with the smallest hash of their index. Deterministic."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    all_idx = np.arange(num_episodes)
    if split == "all":
        return all_idx
    n_eval = int(round(eval_fraction * num_episodes))
    if eval_fraction > 0 and num_episodes > 1:
        n_eval = min(max(n_eval, 1), num_episodes - 1)
    order = sorted(all_idx.tolist(), key=_episode_hash)
    is_eval = np.zeros(num_episodes, bool)
    is_eval[order[:n_eval]] = True
    return all_idx[is_eval] if split == "eval" else all_idx[~is_eval]


def shard_plan(shard_lengths: list[int], selected: np.ndarray, num_shards: int, shard_id: int):
    """(file ids to read, bool mask over all episodes to keep) for one of ``num_shards`` readers.

    With at least ``num_shards`` files, whole files go round-robin to readers (each reads only its files);
    otherwise the selected episodes go round-robin and every reader reads every file.
    """
    total = int(sum(shard_lengths))
    starts = np.concatenate([[0], np.cumsum(shard_lengths)])[:-1]
    keep = np.zeros(total, bool)
    keep[selected] = True
    if len(shard_lengths) >= num_shards:
        files = [f for f in range(len(shard_lengths)) if f % num_shards == shard_id]
        mask = np.zeros(total, bool)
        for f in files:
            mask[starts[f]: starts[f] + shard_lengths[f]] = True
        keep &= mask
    else:
        mine = np.asarray(selected)[shard_id::num_shards]
        keep[:] = False
        keep[mine] = True
    files = [f for f in range(len(shard_lengths)) if keep[starts[f]: starts[f] + shard_lengths[f]].any()]
    return files, keep


class RT1Windows(IterableDataset):
    """Iterable windows of an RT-1-schema RLDS dataset. One sample (a dict):

    context (Tc, 3, h, w) float32 in [-1, 1]   frames at offsets -(Tc-1)*stride .. 0 (clamped to the episode)
    future  (Tf, 3, h, w) float32 in [-1, 1]   frames at offsets stride .. Tf*stride (clamped to the last frame)
    actions (H, 7) float32 normalized (x, y, z, roll, pitch, yaw, gripper); raw if no normalizer was given
    actions_raw (H, 7) float32; terminate (H,) float32 (1 at the terminate step); action_valid (H,) bool
    frame_steps (Tc + Tf,) int64 offsets relative to the current step (before clamping)
    state (Tc, 8) float32, state_raw (Tc, 8): proprioception read with the context frames (only with
        ``state=True``; normalized by ``state_normalizer`` when given): RT-1's base_pose_tool_reached + gripper_closed
    instruction str; episode_index int; step int (the current step)

    Padding past the episode end: actions zero, action_valid False. rank/world_size shard across DDP ranks;
    DataLoader workers shard further. ``set_epoch`` re-seeds the shuffle.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str = "train",
        height: int = 32,
        width: int = 40,
        context_frames: int = 2,
        future_frames: int = 2,
        frame_stride: int = 1,
        horizon: int = 4,
        eval_fraction: float = 0.1,
        normalizer=None,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_parallel_calls: int = 2,
        threads: int = 2,
        max_episodes: int | None = None,
        state: bool = False,
        state_normalizer=None,
    ):
        if min(context_frames, frame_stride, horizon, height, width) < 1 or future_frames < 0:
            raise ValueError("context_frames, frame_stride, horizon, height, width must be >= 1 and future_frames >= 0;"
                             f" got {context_frames}, {frame_stride}, {horizon}, {height}, {width}, {future_frames}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset_dir = Path(dataset_dir).expanduser()
        self.builder = open_rt1_builder(self.dataset_dir)
        info = self.builder.info.splits["train"]
        self.files = [str(p) for p in info.filepaths]
        self.shard_lengths = [int(n) for n in info.shard_lengths]
        self.num_episodes = int(sum(self.shard_lengths))
        self.split, self.eval_fraction = split, float(eval_fraction)
        self.episodes = split_episodes(self.num_episodes, split, self.eval_fraction)
        if max_episodes is not None:
            self.episodes = self.episodes[:max_episodes]
        self.height, self.width = int(height), int(width)
        self.context_frames, self.future_frames = int(context_frames), int(future_frames)
        self.frame_stride, self.horizon = int(frame_stride), int(horizon)
        self.normalizer = normalizer
        self.state, self.state_normalizer = bool(state), state_normalizer
        self.shuffle_buffer, self.seed, self.epoch = int(shuffle_buffer), int(seed), 0
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_parallel_calls, self.threads = int(num_parallel_calls), int(threads)
        self.skipped, self.skipped_episodes = 0, []
        self.corrupt = CorruptRecords()  # corrupt records of the last pass: file -> lost episode indices
        self.offsets = np.array([-(self.context_frames - 1 - i) * self.frame_stride for i in range(self.context_frames)]
                                + [(i + 1) * self.frame_stride for i in range(self.future_frames)], np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Re-seed the file order and window shuffle for a new pass."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------------------ tf.data pipeline
    def _shard(self) -> tuple[int, int]:
        worker = get_worker_info()
        n_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return self.world_size * n_workers, self.rank * n_workers + worker_id

    def tf_dataset(self, num_shards: int = 1, shard_id: int = 0):
        """(tf.data.Dataset of window dicts of numpy-able tensors, expected episode indices of this shard)."""
        from worldmodel.data.tfds_images import import_tf_quietly

        tf, tfds = import_tf_quietly(self.threads)
        files, keep = shard_plan(self.shard_lengths, self.episodes, num_shards, shard_id)
        starts = shard_starts(self.shard_lengths)
        paths = [self.files[f] for f in files]
        first = [int(starts[f]) for f in files]
        shuffle = self.shuffle_buffer > 0
        seed = self.seed * 1_000_003 + self.epoch
        features = self.builder.info.features
        keep_t = tf.constant(keep)
        h, w = self.height, self.width
        Tc, H = self.context_frames, self.horizon
        offsets = tf.constant(self.offsets)
        want_state = self.state

        self.corrupt = CorruptRecords()  # filled as the records are read (in the process iterating)
        ds = record_dataset(tf, paths, [self.shard_lengths[f] for f in files], self.corrupt, first_index=first,
                            shuffle_seed=seed if shuffle else None)
        ds = ds.filter(lambda i, rec: tf.gather(keep_t, i))

        def decode_frame(jpeg):  # bytes -> (h, w, 3) uint8, resized to cover then centre-cropped
            img = tf.io.decode_jpeg(jpeg, channels=3)
            shape = tf.cast(tf.shape(img)[:2], tf.float32)
            scale = tf.maximum(h / shape[0], w / shape[1])
            size = tf.cast(tf.math.ceil(shape * scale), tf.int32)
            img = tf.image.resize(img, size, method="area" if h < 256 else "bilinear", antialias=True)
            top, left = (size[0] - h) // 2, (size[1] - w) // 2
            return tf.cast(tf.round(tf.clip_by_value(img[top: top + h, left: left + w], 0, 255)), tf.uint8)

        def parse(i, record):
            ep = features.deserialize_example(record, decoders={"steps": tfds.decode.SkipDecoding()})
            steps = ep["steps"]
            act = steps["action"]
            frames = tf.map_fn(decode_frame, steps["observation"]["image"],
                               fn_output_signature=tf.TensorSpec((h, w, 3), tf.uint8))  # (T, h, w, 3)
            raw = tf.concat([act["world_vector"], act["rotation_delta"], act["gripper_closedness_action"]], -1)
            obs = steps["observation"]
            extra = {}
            if want_state:  # (T, 8): RT-1's tool pose + gripper closedness
                extra["state"] = tf.concat([obs["base_pose_tool_reached"], obs["gripper_closed"]], -1)
            return {**extra, "index": i, "frames": frames, "actions": tf.cast(raw, tf.float32),  # (T, 7)
                    "terminate": tf.cast(tf.equal(act["terminate_episode"][:, 0], 1), tf.float32),  # (T,)
                    "instruction": steps["observation"]["natural_language_instruction"][0]}

        ds = ds.map(parse, num_parallel_calls=self.num_parallel_calls, deterministic=True)
        ds = ds.ignore_errors()  # a record that fails to parse, or a frame to decode, drops its episode alone

        def windows(ep):
            T = tf.shape(ep["frames"], out_type=tf.int64)[0]

            def window(t):
                frame_idx = tf.clip_by_value(t + offsets, 0, T - 1)  # (Tc + Tf,)
                frames = tf.gather(ep["frames"], frame_idx)
                act_idx = t + tf.range(H, dtype=tf.int64)  # (H,)
                valid = act_idx < T
                safe = tf.minimum(act_idx, T - 1)
                actions = tf.where(valid[:, None], tf.gather(ep["actions"], safe), 0.0)
                terminate = tf.where(valid, tf.gather(ep["terminate"], safe), 0.0)
                out = {"context": frames[:Tc], "future": frames[Tc:], "actions_raw": actions, "terminate": terminate,
                       "action_valid": valid, "frame_steps": offsets, "instruction": ep["instruction"],
                       "episode_index": ep["index"], "step": t}
                if want_state:
                    out["state_raw"] = tf.gather(ep["state"], frame_idx[:Tc])  # (Tc, 8) with the context frames
                return out

            return tf.data.Dataset.range(T).map(window)

        ds = ds.flat_map(windows)
        if shuffle:
            ds = ds.shuffle(self.shuffle_buffer, seed=seed)
        ds = ds.prefetch(2)
        options = tf.data.Options()
        options.threading.private_threadpool_size = max(self.threads, 1)
        options.threading.max_intra_op_parallelism = 1
        options.deterministic = True
        return ds.with_options(options), np.flatnonzero(keep)

    # ------------------------------------------------------------------------------------ torch side
    def _to_sample(self, el: dict) -> dict:
        def frames(x):  # (T, h, w, 3) uint8 -> (T, 3, h, w) float32 in [-1, 1]
            return torch.from_numpy(np.array(x, np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)

        raw = np.array(el["actions_raw"], np.float32)  # (H, 7), copied: TF arrays are read-only
        valid = np.array(el["action_valid"], bool)
        norm = raw if self.normalizer is None else np.asarray(self.normalizer.normalize(raw), np.float32)
        norm = np.where(valid[:, None], norm, 0.0).astype(np.float32)
        extra = {}
        if self.state:
            state_raw = np.array(el["state_raw"], np.float32)  # (Tc, 8)
            state = state_raw if self.state_normalizer is None else self.state_normalizer.normalize(state_raw)
            extra = {"state": torch.from_numpy(np.asarray(state, np.float32)), "state_raw": torch.from_numpy(state_raw)}
        return {
            **extra,
            "context": frames(el["context"]), "future": frames(el["future"]),
            "actions": torch.from_numpy(norm), "actions_raw": torch.from_numpy(raw),
            "terminate": torch.from_numpy(np.array(el["terminate"], np.float32)),
            "action_valid": torch.from_numpy(valid),
            "frame_steps": torch.from_numpy(np.array(el["frame_steps"], np.int64)),
            "instruction": bytes(el["instruction"]).decode("utf-8", errors="replace"),
            "episode_index": int(el["episode_index"]), "step": int(el["step"]),
        }

    def __iter__(self):
        num_shards, shard_id = self._shard()
        ds, expected = self.tf_dataset(num_shards, shard_id)
        seen: set[int] = set()
        for el in ds.as_numpy_iterator():
            sample = self._to_sample(el)
            seen.add(sample["episode_index"])
            yield sample
        missing = sorted(set(expected.tolist()) - seen)
        new = [i for i in missing if i not in self.skipped_episodes]
        if new:
            self.skipped_episodes.extend(new)
            self.skipped += len(new)
            lost = self.corrupt.indices
            corrupt = [i for i in new if i in lost]
            why = [f"{len(corrupt)} with a corrupt record (failed checksum: {self.corrupt.describe(set(new))})"]
            if len(corrupt) < len(new):
                why.append(f"{len(new) - len(corrupt)} whose record or frames failed to decode")
            why = ", ".join(why[0 if corrupt else 1:])
            warnings.warn(f"RT1Windows: skipped {len(new)} episode(s) of {self.dataset_dir}: {why} "
                          f"(episode indices {new[:10]}); total skipped {self.skipped}", stacklevel=2)


def collate_rt1(batch: list[dict]) -> dict:
    """Stack RT1Windows samples: tensors gain a batch dim; instruction stays a list of str."""
    if not batch:
        raise ValueError("collate_rt1 got an empty list of samples")
    out: dict = {}
    for key, value in batch[0].items():
        if torch.is_tensor(value):
            out[key] = torch.stack([s[key] for s in batch])
        elif isinstance(value, int):
            out[key] = torch.tensor([s[key] for s in batch], dtype=torch.int64)
        else:
            out[key] = [s[key] for s in batch]
    return out
