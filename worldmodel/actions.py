"""RT-1 actions: the 7-D vector, terminate flags, and quantile normalization.

A step's action is ``[x, y, z, roll, pitch, yaw, gripper]``: world_vector (metres), rotation_delta
(radians) and gripper_closedness_action (+1 close, -1 open, relative); terminate_episode is a separate
one-hot. The six continuous dimensions are mapped by their 1st/99th percentiles of the training split to
[-1, 1] (clipped); the gripper is left as it is. Translations have outliers (up to 22 m in RT-1), so
min/max is never used. Stats are JSON (stored in every fine-tuning checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from worldmodel.media_io import write_atomic

log = logging.getLogger(__name__)

DIM_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
NUM_CONTINUOUS = 6
STATS_KIND = "rt1_action_quantiles"
_EPS = 1e-6  # a dimension whose q99 - q01 is below this is constant: it normalizes to 0


def rt1_action(action: dict) -> np.ndarray:
    """RT-1 ``steps/action`` fields (each (..., k)) -> (..., 7) float32 [world_vector, rotation_delta, gripper]."""
    return np.concatenate([np.asarray(action["world_vector"], np.float32),
                           np.asarray(action["rotation_delta"], np.float32),
                           np.asarray(action["gripper_closedness_action"], np.float32).reshape(
                               *np.shape(action["world_vector"])[:-1], 1)], -1)


def terminate_flag(terminate_episode) -> np.ndarray:
    """RT-1 ``terminate_episode`` one-hot (..., 3) int -> (...) bool: True where element 0 is set (terminate)."""
    te = np.asarray(terminate_episode)
    if te.shape[-1:] != (3,):
        raise ValueError(f"terminate_episode must be a (..., 3) one-hot, got shape {te.shape}")
    return te[..., 0] == 1


class ActionNormalizer:
    """Per-dimension quantile normalization of (..., 7) actions; works on numpy arrays and torch tensors.

    q01, q99: (6,) percentiles of x y z roll pitch yaw. mean: optional (7,) training mean (raw units),
    kept for the predict-the-mean baseline. num_steps: how many steps the stats came from.
    """

    def __init__(self, q01, q99, mean=None, num_steps: int = 0):
        self.q01 = np.asarray(q01, np.float64).reshape(-1)
        self.q99 = np.asarray(q99, np.float64).reshape(-1)
        if self.q01.shape != (NUM_CONTINUOUS,) or self.q99.shape != (NUM_CONTINUOUS,):
            raise ValueError(f"q01 and q99 need {NUM_CONTINUOUS} values (x y z roll pitch yaw), got "
                             f"{self.q01.shape} and {self.q99.shape}")
        if not (np.all(np.isfinite(self.q01)) and np.all(np.isfinite(self.q99)) and np.all(self.q99 >= self.q01)):
            raise ValueError(f"action stats must be finite with q99 >= q01, got q01={self.q01}, q99={self.q99}")
        self.mean = np.zeros(7) if mean is None else np.asarray(mean, np.float64).reshape(7)
        self.num_steps = int(num_steps)

    def _params(self, like):
        span = self.q99 - self.q01
        const = span < _EPS
        lo, span = self.q01, np.where(const, 1.0, span)
        if torch.is_tensor(like):
            def conv(a):
                return torch.as_tensor(a, dtype=like.dtype, device=like.device)
            return conv(lo), conv(span), torch.as_tensor(const, device=like.device)
        return lo.astype(like.dtype), span.astype(like.dtype), const

    def normalize(self, actions):
        """(..., 7) raw -> (..., 7): first 6 dims to [-1, 1] (clipped), gripper unchanged."""
        x = actions if torch.is_tensor(actions) else np.asarray(actions, np.float32)
        self._check(x)
        lo, span, const = self._params(x)
        cont = 2.0 * (x[..., :NUM_CONTINUOUS] - lo) / span - 1.0
        if torch.is_tensor(x):
            cont = torch.where(const, torch.zeros_like(cont), cont.clamp(-1.0, 1.0))
            return torch.cat([cont, x[..., NUM_CONTINUOUS:]], -1)
        cont = np.where(const, 0.0, np.clip(cont, -1.0, 1.0)).astype(x.dtype)
        return np.concatenate([cont, x[..., NUM_CONTINUOUS:]], -1)

    def unnormalize(self, actions):
        """(..., 7) normalized -> (..., 7) raw units (inputs outside [-1, 1] are clipped first)."""
        x = actions if torch.is_tensor(actions) else np.asarray(actions, np.float32)
        self._check(x)
        lo, span, const = self._params(x)
        if torch.is_tensor(x):
            cont = (x[..., :NUM_CONTINUOUS].clamp(-1.0, 1.0) + 1.0) / 2.0 * span + lo
            cont = torch.where(const, lo.expand_as(cont), cont)
            return torch.cat([cont, x[..., NUM_CONTINUOUS:]], -1)
        cont = (np.clip(x[..., :NUM_CONTINUOUS], -1.0, 1.0) + 1.0) / 2.0 * span + lo
        cont = np.where(const, lo, cont).astype(x.dtype)
        return np.concatenate([cont, x[..., NUM_CONTINUOUS:]], -1)

    @staticmethod
    def _check(x) -> None:
        if x.shape[-1] != 7:
            raise ValueError(f"actions must be (..., 7) [x y z roll pitch yaw gripper], got shape {tuple(x.shape)}")

    def to_dict(self) -> dict:
        return {"kind": STATS_KIND, "dims": list(DIM_NAMES), "q01": self.q01.tolist(), "q99": self.q99.tolist(),
                "mean": self.mean.tolist(), "num_steps": self.num_steps}

    @classmethod
    def from_dict(cls, d: dict) -> ActionNormalizer:
        """Strict: every key must be present (a normalizer never silently skips stats)."""
        missing = [k for k in ("kind", "q01", "q99", "mean") if k not in d]
        if missing or d.get("kind") != STATS_KIND:
            raise ValueError(f"not RT-1 action stats (kind {STATS_KIND!r}); missing {missing} in keys {sorted(d)}. "
                             "Recompute them with worldmodel.actions.compute_action_stats")
        return cls(d["q01"], d["q99"], d["mean"], d.get("num_steps", 0))

    def __repr__(self) -> str:
        return f"ActionNormalizer(q01={np.round(self.q01, 4).tolist()}, q99={np.round(self.q99, 4).tolist()})"


def stats_from_actions(actions: np.ndarray) -> ActionNormalizer:
    """Exact quantiles of (N, 7) raw actions (N steps)."""
    actions = np.asarray(actions, np.float64)
    if actions.ndim != 2 or actions.shape[1] != 7 or len(actions) == 0:
        raise ValueError(f"need a non-empty (N, 7) array of actions, got shape {actions.shape}")
    q01, q99 = np.quantile(actions[:, :NUM_CONTINUOUS], [0.01, 0.99], axis=0)
    return ActionNormalizer(q01, q99, actions.mean(0), len(actions))


def compute_action_stats(source, eval_fraction: float = 0.1, max_episodes: int | None = None,
                         threads: int = 2) -> ActionNormalizer:
    """One pass over the training split's actions (images are never decoded): exact q01/q99 per dimension.

    source: a dataset version directory, or an RT1Windows (its directory and eval_fraction are used).
    All steps are held in memory (RT-1's 3.79M steps x 7 float32 = about 106 MB).
    """
    from worldmodel.data.rt1_reader import RT1Windows

    if isinstance(source, RT1Windows):
        source, eval_fraction = source.dataset_dir, source.eval_fraction

    def fields(steps, tf):
        act = steps["action"]
        return tf.concat([act["world_vector"], act["rotation_delta"], act["gripper_closedness_action"]], -1)

    return stats_from_actions(read_train_steps(source, fields, eval_fraction, max_episodes, threads, "actions"))


def read_train_steps(source, fields, eval_fraction: float = 0.1, max_episodes: int | None = None, threads: int = 2,
                     what: str = "steps") -> np.ndarray:
    """(N, D) float32 of ``fields(steps, tf) -> (T, D)`` over every step of the training split (images never
    decoded). The pass behind the action and state statistics."""
    from worldmodel.data.rt1_reader import open_rt1_builder, split_episodes
    from worldmodel.data.tfds_images import import_tf_quietly
    from worldmodel.data.tfrecords import CorruptRecords, record_dataset

    builder = open_rt1_builder(source)
    tf, tfds = import_tf_quietly(threads)
    info = builder.info.splits["train"]
    lengths = [int(n) for n in info.shard_lengths]
    n = int(sum(lengths))
    keep = np.zeros(n, bool)
    train = split_episodes(n, "train", eval_fraction)
    keep[train[:max_episodes] if max_episodes is not None else train] = True
    features = builder.info.features
    decoders = {"steps": tfds.decode.SkipDecoding()}

    def parse(record):
        return fields(features.deserialize_example(record, decoders=decoders)["steps"], tf)

    corrupt = CorruptRecords()  # the same verified record stream as RT1Windows: the same records are skipped
    ds = record_dataset(tf, [str(p) for p in info.filepaths], lengths, corrupt)
    ds = ds.filter(lambda i, r: tf.gather(tf.constant(keep), i))
    ds = ds.map(lambda i, r: parse(r), num_parallel_calls=threads).ignore_errors().prefetch(4)
    chunks = [np.array(a, np.float32) for a in ds.as_numpy_iterator()]  # each (T, D)
    lost = sorted(i for i in corrupt.indices if keep[i])
    if lost:
        warnings.warn(f"{what} statistics of {source}: skipped {len(lost)} training episode(s) with a corrupt "
                      f"record (failed checksum: {corrupt.describe(set(lost))}), as training does", stacklevel=2)
    if not chunks:
        raise ValueError(f"no training {what} could be read from {source}: is the train split empty?")
    return np.concatenate(chunks)


def _writable(directory: Path) -> bool:
    return directory.is_dir() and os.access(directory, os.W_OK)


def load_or_compute_stats(dataset_dir: str | Path, cache_dir: str | Path | None = None,
                          eval_fraction: float = 0.1) -> ActionNormalizer:
    """Stats cached as JSON beside the data (``action_stats_train_ef<fraction>.json``), or under ``cache_dir``
    (default ~/.cache/worldmodel/action_stats) when the data directory is read-only; computed once."""
    return cached_stats(dataset_dir, f"action_stats_train_ef{eval_fraction:g}.json",
                        lambda: compute_action_stats(dataset_dir, eval_fraction=eval_fraction),
                        ActionNormalizer.from_dict, cache_dir)


def dataset_fingerprint(dataset_dir: str | Path) -> str:
    """A digest of an RLDS version directory: the content of dataset_info.json / features.json (shard lengths
    included) and every TFRecord shard's name, size and modification time. A rewritten, regrown or edited
    dataset gets another fingerprint (a copy that does not keep modification times does too: its statistics
    are recomputed once); computing it reads no shard."""
    import hashlib

    directory = Path(dataset_dir).expanduser()
    digest = hashlib.sha1()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and (
            ".tfrecord" in p.name or p.name in ("dataset_info.json", "features.json"))):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cached_stats(dataset_dir: str | Path, name: str, compute, from_dict, cache_dir: str | Path | None = None):
    """Statistics JSON ``name`` beside the data (or under ``cache_dir`` when it is read-only): read when its
    ``dataset_fingerprint`` matches the data's (``dataset_fingerprint``), else ``compute()`` and written
    atomically, so a changed dataset never reuses stale statistics. ``from_dict`` parses it; the result has
    ``to_dict()``."""
    import hashlib

    from worldmodel.checkpoint import read_json

    dataset_dir = Path(dataset_dir).expanduser().resolve()
    fingerprint = dataset_fingerprint(dataset_dir)
    beside = dataset_dir / name
    default = Path.home() / ".cache" / "worldmodel" / "action_stats"
    root = Path(cache_dir).expanduser() if cache_dir is not None else default
    cached = root / f"{hashlib.sha1(str(dataset_dir).encode()).hexdigest()[:12]}_{name}"
    for path in (beside, cached):
        if path.exists():
            data = read_json(path)
            if isinstance(data, dict) and data.pop("dataset_fingerprint", None) == fingerprint:
                try:
                    return from_dict(data)
                except ValueError as err:
                    raise ValueError(f"{path}: {err} (delete the file to recompute it)") from err
            log.info("%s was computed from other data than %s holds now: recomputing", path, dataset_dir)
    stats = compute()
    target = beside if _writable(dataset_dir) else cached
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**stats.to_dict(), "dataset_fingerprint": fingerprint}, indent=1)
    write_atomic(target, lambda tmp: tmp.write_text(text))  # ranks may write the same stats at once
    log.info("stats %s written to %s", stats, target)
    return stats
