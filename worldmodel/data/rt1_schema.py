"""The RT-1 (`fractal20220817_data`, version 0.1.0, RLDS) feature spec, and a check that a dataset matches it.

The spec is the one the published dataset carries (TFDS catalog, Open X-Embodiment): an episode holds
``steps`` plus ``aspects`` (5 bools: crowd-compute ratings) and ``attributes`` (int64 codes with their
``*_name`` strings). The reader only reads ``steps``; ``aspects`` and ``attributes`` are written (zeros /
"UNSPECIFIED") so datasets made by ``rt1_writer`` have the exact published structure, down to the tfds
feature class of each of the 41 leaves in ``features.json`` (`PUBLISHED_LEAVES`): the published dataset
declares its scalar flags, instruction, aspects and attributes as ``Tensor`` of shape () (bool, string,
int64), not tfds ``Scalar`` / ``Text``; only ``steps/reward`` is a ``Scalar``.
"""

from __future__ import annotations

NAME = "fractal20220817_data"
VERSION = "0.1.0"
IMAGE_SHAPE = (256, 320, 3)  # (H, W, C) uint8, JPEG-encoded in the files
GCS_PATH = "gs://gresearch/robotics/fractal20220817_data/0.1.0"

ASPECTS = ("already_success", "feasible", "has_aspects", "success", "undesirable")  # bool each
ATTRIBUTES = ("collection_mode", "data_type", "env", "location", "objects_family", "task_family")  # int64 + *_name

# steps/action: name -> (shape, dtype)
ACTION_SPEC = {
    "world_vector": ((3,), "float32"),  # metres, base frame
    "rotation_delta": ((3,), "float32"),  # roll, pitch, yaw (radians), base frame
    "gripper_closedness_action": ((1,), "float32"),  # relative: +1 close, -1 open
    "base_displacement_vector": ((2,), "float32"),
    "base_displacement_vertical_rotation": ((1,), "float32"),
    "terminate_episode": ((3,), "int32"),  # one-hot: [terminate, continue, (unused)] in RT-1's convention
}

# steps/observation (besides image and natural_language_instruction): name -> (shape, dtype)
OBSERVATION_SPEC = {
    "natural_language_embedding": ((512,), "float32"),  # Universal Sentence Encoder
    "base_pose_tool_reached": ((7,), "float32"),  # xyz + quaternion
    "gripper_closed": ((1,), "float32"),
    "gripper_closedness_commanded": ((1,), "float32"),
    "height_to_bottom": ((1,), "float32"),
    "orientation_box": ((2, 3), "float32"),
    "orientation_start": ((4,), "float32"),
    "src_rotation": ((4,), "float32"),
    "robot_orientation_positions_box": ((3, 3), "float32"),
    "workspace_bounds": ((3, 3), "float32"),
    "rotation_delta_to_go": ((3,), "float32"),
    "vector_to_go": ((3,), "float32"),
}

# What the reader needs: feature path -> (shape, dtype). Checked by `check_rt1_schema`.
REQUIRED = {
    "steps/observation/image": (IMAGE_SHAPE, "uint8"),
    "steps/observation/natural_language_instruction": ((), "string"),
    "steps/action/world_vector": ((3,), "float32"),
    "steps/action/rotation_delta": ((3,), "float32"),
    "steps/action/gripper_closedness_action": ((1,), "float32"),
    "steps/action/terminate_episode": ((3,), "int32"),
    "steps/is_first": ((), "bool"),
    "steps/is_last": ((), "bool"),
}



def published_leaves() -> dict[str, tuple[str, tuple, str]]:
    """The 41 leaves of the published ``features.json``: path -> (tfds feature class, shape, dtype)."""
    leaves = {f"steps/action/{k}": ("Tensor", shape, dtype) for k, (shape, dtype) in ACTION_SPEC.items()}
    leaves.update({f"steps/observation/{k}": ("Tensor", shape, dtype)
                   for k, (shape, dtype) in OBSERVATION_SPEC.items()})
    leaves["steps/observation/image"] = ("Image", IMAGE_SHAPE, "uint8")
    leaves["steps/observation/natural_language_instruction"] = ("Tensor", (), "string")
    leaves.update({f"steps/{k}": ("Tensor", (), "bool") for k in ("is_first", "is_last", "is_terminal")})
    leaves["steps/reward"] = ("Scalar", (), "float32")
    leaves.update({f"aspects/{k}": ("Tensor", (), "bool") for k in ASPECTS})
    for name in ATTRIBUTES:
        leaves[f"attributes/{name}"] = ("Tensor", (), "int64")
        leaves[f"attributes/{name}_name"] = ("Tensor", (), "string")
    return leaves


def feature_leaves(features_json: dict) -> dict[str, tuple[str, tuple, str]]:
    """The leaves of a tfds ``features.json`` (as loaded): path -> (feature class, shape, dtype); Text has
    shape () and dtype "string"."""
    out: dict[str, tuple[str, tuple, str]] = {}

    def walk(node: dict, path: str) -> None:
        if "featuresDict" in node:
            for key, child in node["featuresDict"]["features"].items():
                walk(child, f"{path}/{key}" if path else key)
        elif "sequence" in node:  # tfds Dataset: its steps keep the sequence's path
            walk(node["sequence"]["feature"], path)
        else:
            cls = node["pythonClassName"].rsplit(".", 1)[-1]
            body = node.get("tensor") or node.get("image") or {}
            shape = tuple(int(d) for d in body.get("shape", {}).get("dimensions", []))
            out[path] = (cls, shape, "string" if cls == "Text" else body.get("dtype", ""))

    walk(features_json, "")
    return out


def rt1_features():
    """The exact `fractal20220817_data` 0.1.0 episode spec as a ``tfds.features.FeaturesDict``."""
    import numpy as np
    import tensorflow_datasets as tfds

    F = tfds.features

    def tensor(shape, dtype):
        return F.Tensor(shape=shape, dtype=getattr(np, dtype))

    observation = {name: tensor(shape, dtype) for name, (shape, dtype) in OBSERVATION_SPEC.items()}
    observation["image"] = F.Image(shape=IMAGE_SHAPE, dtype=np.uint8, encoding_format="jpeg")
    observation["natural_language_instruction"] = tensor((), "str_")  # Tensor(shape=(), dtype=string)
    step = F.FeaturesDict({
        "action": F.FeaturesDict({name: tensor(shape, dtype) for name, (shape, dtype) in ACTION_SPEC.items()}),
        "observation": F.FeaturesDict(observation),
        "is_first": tensor((), "bool_"),
        "is_last": tensor((), "bool_"),
        "is_terminal": tensor((), "bool_"),
        "reward": F.Scalar(dtype=np.float32),  # the one Scalar of the published spec
    })
    attributes = {}
    for name in ATTRIBUTES:
        attributes[name] = tensor((), "int64")
        attributes[f"{name}_name"] = tensor((), "str_")
    return F.FeaturesDict({
        "steps": F.Dataset(step),
        "aspects": F.FeaturesDict({name: tensor((), "bool_") for name in ASPECTS}),
        "attributes": F.FeaturesDict(attributes),
    })


def _dtype_name(dtype) -> str:
    """'float32', 'uint8', 'string', 'bool', ... for a numpy or TF dtype."""
    import numpy as np

    name = getattr(dtype, "name", None) or np.dtype(dtype).name
    if name in ("object", "bytes", "str") or "str" in name or "bytes" in name:
        return "string"
    return name


def flatten_features(features) -> dict[str, tuple[tuple, str]]:
    """Flatten a FeaturesDict to {'steps/observation/image': ((256, 320, 3), 'uint8'), ...}."""
    out: dict[str, tuple[tuple, str]] = {}

    def walk(info, prefix: str) -> None:
        if isinstance(info, dict):
            for key, value in info.items():
                walk(value, f"{prefix}/{key}" if prefix else key)
        else:
            out[prefix] = (tuple(info.shape), _dtype_name(info.dtype))

    walk(features.get_tensor_info(), "")
    return out


def flat_features(builder) -> dict[str, tuple[tuple, str]]:
    """{'steps/action/world_vector': ((3,), 'float32'), ...} for a builder's episode features."""
    return flatten_features(builder.info.features)


def check_rt1_schema(builder) -> None:
    """Raise ValueError naming every feature the reader needs that is missing or has another shape/dtype."""
    flat = flat_features(builder)
    problems = []
    for path, (shape, dtype) in REQUIRED.items():
        if path not in flat:
            problems.append(f"missing {path} ({dtype}{list(shape)})")
            continue
        got_shape, got_dtype = flat[path]
        if path == "steps/observation/image":  # any image size is resized by the reader; it must be uint8 RGB
            ok = len(got_shape) == 3 and got_shape[-1] == 3 and got_dtype == "uint8"
        else:
            ok = tuple(got_shape) == tuple(shape) and got_dtype == dtype
        if not ok:
            problems.append(f"{path} is {got_dtype}{list(got_shape)}, expected {dtype}{list(shape)}")
    if problems:
        where = getattr(builder, "data_dir", "the dataset")
        raise ValueError(
            f"{where} does not have RT-1's schema ({NAME} {VERSION}): " + "; ".join(problems)
            + f". Point the reader at a local copy of {GCS_PATH} (the version directory), or write a dataset "
            "with worldmodel.data.rt1_writer.write_rt1_dataset."
        )
