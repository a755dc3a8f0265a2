"""Write episodes as an RLDS dataset with RT-1's exact schema, offline, through tfds's own writer.

The result opens with ``tfds.builder_from_directory(out_dir / name / version)``, exactly like a local
copy of ``gs://gresearch/robotics/fractal20220817_data/0.1.0``, so one reader serves both.

An episode is a plain dict (T = number of steps; frame t is what the robot saw before action t):

    frames        (T, 256, 320, 3) uint8 RGB, or a sequence of T JPEG-encoded ``bytes``
    instruction   str
    actions       dict, each (T, ...) array:
                    world_vector (T, 3) metres, rotation_delta (T, 3) roll/pitch/yaw radians,
                    gripper_closedness_action (T, 1) or (T,) (+1 close, -1 open),
                    terminate_episode (T, 3) int one-hot or (T,) bool (True = terminate);
                  optional: base_displacement_vector (T, 2), base_displacement_vertical_rotation (T, 1)
    observation   optional dict of other `steps/observation` fields (T, ...) (rt1_schema.OBSERVATION_SPEC)
    reward        optional (T,) float; is_terminal optional (T,) bool (default: True at the last step)
    aspects       optional {name: bool}; attributes optional {name: int, name_name: str}

Missing optional fields are zeros. ``terminate_episode`` as bool becomes RT-1's one-hot:
[1, 0, 0] at a terminate step, [0, 1, 0] otherwise.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from worldmodel.data.rt1_schema import (
    ACTION_SPEC,
    ASPECTS,
    ATTRIBUTES,
    IMAGE_SHAPE,
    NAME,
    OBSERVATION_SPEC,
    VERSION,
    rt1_features,
)

log = logging.getLogger(__name__)

REQUIRED_ACTIONS = ("world_vector", "rotation_delta", "gripper_closedness_action", "terminate_episode")


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes (PIL: much faster per frame than a TF session)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def terminate_one_hot(terminate: np.ndarray) -> np.ndarray:
    """(T,) bool -> (T, 3) int32 RT-1 one-hot: [1, 0, 0] terminate, [0, 1, 0] continue."""
    terminate = np.asarray(terminate).astype(bool).reshape(-1)
    out = np.zeros((len(terminate), 3), np.int32)
    out[terminate, 0] = 1
    out[~terminate, 1] = 1
    return out


def _steps_array(value, shape: tuple, dtype: str, T: int, where: str) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.shape == (T,) and shape == (1,):
        arr = arr[:, None]
    if arr.shape != (T, *shape):
        raise ValueError(f"{where} has shape {arr.shape}, expected {(T, *shape)}: one row per step")
    return arr


def episode_to_example(episode: dict, index: int = 0, quality: int = 90) -> dict:
    """Validate one episode dict (see module docstring) and return the RLDS example tfds encodes."""
    where = f"episode {index}"
    for key in ("frames", "instruction", "actions"):
        if key not in episode:
            raise ValueError(f"{where} has no {key!r}: an episode needs frames, instruction and actions "
                             "(see worldmodel/data/rt1_writer.py)")
    frames = episode["frames"]
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"{where}: frames are {frames.dtype}{list(frames.shape)}, expected uint8 (T, 256, 320, 3) "
                             "(RT-1's camera size): resize or pad them to 256x320 before writing")
        images = [encode_jpeg(f, quality) for f in frames]
    else:
        images = list(frames)
        if not all(isinstance(b, bytes) for b in images):
            raise ValueError(f"{where}: frames must be a uint8 array (T, 256, 320, 3) or a list of JPEG bytes")
    T = len(images)
    if T == 0:
        raise ValueError(f"{where} has no steps: write episodes with at least one step")
    actions_in = dict(episode["actions"])
    missing = [k for k in REQUIRED_ACTIONS if k not in actions_in]
    if missing:
        raise ValueError(f"{where}: actions lack {missing}; give each as a (T, ...) array")
    unknown = sorted(set(actions_in) - set(ACTION_SPEC))
    if unknown:
        raise ValueError(f"{where}: unknown action keys {unknown}; RT-1's are {sorted(ACTION_SPEC)}")
    term = np.asarray(actions_in["terminate_episode"])
    if term.ndim == 1:
        actions_in["terminate_episode"] = terminate_one_hot(term)
    actions = {name: _steps_array(actions_in.get(name, np.zeros((T, *shape))), shape, dtype, T,
                                  f"{where} action {name}")
               for name, (shape, dtype) in ACTION_SPEC.items()}
    obs_in = dict(episode.get("observation", {}))
    unknown = sorted(set(obs_in) - set(OBSERVATION_SPEC))
    if unknown:
        raise ValueError(f"{where}: unknown observation keys {unknown}; allowed: {sorted(OBSERVATION_SPEC)}")
    obs = {name: _steps_array(obs_in.get(name, np.zeros((T, *shape))), shape, dtype, T, f"{where} observation {name}")
           for name, (shape, dtype) in OBSERVATION_SPEC.items()}
    reward = _steps_array(episode.get("reward", np.zeros(T)), (), "float32", T, f"{where} reward")
    is_terminal = episode.get("is_terminal")
    if is_terminal is None:
        is_terminal = np.arange(T) == T - 1
    is_terminal = _steps_array(is_terminal, (), "bool", T, f"{where} is_terminal")
    instruction = str(episode["instruction"])
    steps = []
    for t in range(T):
        observation = {name: obs[name][t] for name in OBSERVATION_SPEC}
        observation["image"] = images[t]
        observation["natural_language_instruction"] = instruction
        steps.append({
            "action": {name: actions[name][t] for name in ACTION_SPEC},
            "observation": observation,
            "is_first": t == 0,
            "is_last": t == T - 1,
            "is_terminal": bool(is_terminal[t]),
            "reward": float(reward[t]),
        })
    aspects = {name: bool(episode.get("aspects", {}).get(name, False)) for name in ASPECTS}
    attrs_in = episode.get("attributes", {})
    attributes = {}
    for name in ATTRIBUTES:
        attributes[name] = int(attrs_in.get(name, 0))
        attributes[f"{name}_name"] = str(attrs_in.get(f"{name}_name", "UNSPECIFIED"))
    return {"steps": steps, "aspects": aspects, "attributes": attributes}


def write_rt1_dataset(
    episodes: Iterable[dict],
    out_dir: str | Path,
    name: str = NAME,
    version: str = VERSION,
    description: str = "Episodes written by worldmodel.data.rt1_writer with RT-1's fractal20220817_data schema.",
    jpeg_quality: int = 90,
    overwrite: bool = False,
) -> Path:
    """Write episodes (see module docstring) to ``out_dir/name/version``; returns that version directory.

    Records keep the given order (shuffling disabled): episode i is record i of the ``train`` split, which the
    reader uses for its held-out split and sharding. Raises FileExistsError if the directory holds a dataset
    (unless overwrite).
    """
    import tensorflow_datasets as tfds

    out_dir = Path(out_dir).expanduser()
    target = out_dir / name / version
    if (target / "dataset_info.json").exists():
        if not overwrite:
            raise FileExistsError(f"{target} already holds a dataset: pass overwrite=True or choose another out_dir")
        import shutil

        shutil.rmtree(target)
    source = iter(episodes)
    features = rt1_features()

    def generate():
        count = 0
        for i, episode in enumerate(source):
            yield i, episode_to_example(episode, i, jpeg_quality)
            count += 1
        if count == 0:
            raise ValueError("write_rt1_dataset got no episodes: pass at least one episode dict")

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self):
            return self.dataset_info_from_configs(description=description, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": generate()}

        def _generate_examples(self):  # pragma: no cover - _split_generators passes the generator directly
            return generate()

    _Builder.name = name
    builder = _Builder(data_dir=str(out_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    log.info("wrote %s episodes to %s", builder.info.splits["train"].num_examples, target)
    return target
