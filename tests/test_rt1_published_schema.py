"""Datasets written here declare the published fractal20220817_data feature classes, leaf for leaf."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from worldmodel.data.rt1_schema import feature_leaves, published_leaves  # noqa: E402
from worldmodel.data.rt1_synthetic import ensure_embedded_sample  # noqa: E402
from worldmodel.data.rt1_writer import write_rt1_dataset  # noqa: E402

# The published features.json's leaves that are neither a float Tensor nor the image, by hand from the issue
# and the TFDS catalog: Tensor of shape () with dtype bool / int64 / string, and reward the one Scalar.
BY_HAND = {
    "steps/is_first": ("Tensor", (), "bool"), "steps/is_last": ("Tensor", (), "bool"),
    "steps/is_terminal": ("Tensor", (), "bool"), "steps/reward": ("Scalar", (), "float32"),
    "steps/observation/natural_language_instruction": ("Tensor", (), "string"),
    "steps/observation/image": ("Image", (256, 320, 3), "uint8"),
    "steps/action/terminate_episode": ("Tensor", (3,), "int32"),
    **{f"aspects/{k}": ("Tensor", (), "bool")
       for k in ("already_success", "feasible", "has_aspects", "success", "undesirable")},
    **{f"attributes/{k}": ("Tensor", (), "int64")
       for k in ("collection_mode", "data_type", "env", "location", "objects_family", "task_family")},
    **{f"attributes/{k}_name": ("Tensor", (), "string")
       for k in ("collection_mode", "data_type", "env", "location", "objects_family", "task_family")},
}


def _episode(T: int = 3) -> dict:
    rng = np.random.default_rng(0)
    return {"frames": rng.integers(0, 255, (T, 256, 320, 3), dtype=np.uint8), "instruction": "pick coke can",
            "actions": {"world_vector": rng.normal(size=(T, 3)), "rotation_delta": rng.normal(size=(T, 3)),
                        "gripper_closedness_action": np.ones(T), "terminate_episode": np.arange(T) == T - 1},
            "reward": np.arange(T, dtype=np.float32), "aspects": {"success": True, "feasible": True},
            "attributes": {"env": 7, "env_name": "kitchen"}}


def test_published_spec_has_41_leaves_as_the_catalog_says():
    leaves = published_leaves()
    assert len(leaves) == 41
    for path, want in BY_HAND.items():
        assert leaves[path] == want, path
    assert sum(cls == "Tensor" and dtype == "float32" for cls, _, dtype in leaves.values()) == 41 - len(BY_HAND)


def test_written_features_json_equals_the_published_leaves_and_values_read_back(tmp_path):
    import tensorflow_datasets as tfds

    path = write_rt1_dataset([_episode()], tmp_path)
    written = feature_leaves(json.loads((path / "features.json").read_text()))
    assert written == published_leaves()
    ep = next(iter(tfds.as_numpy(tfds.builder_from_directory(str(path)).as_dataset(split="train"))))
    steps = list(ep["steps"])
    assert [bool(s["is_first"]) for s in steps] == [True, False, False]
    assert [bool(s["is_last"]) for s in steps] == [False, False, True] == [bool(s["is_terminal"]) for s in steps]
    assert steps[0]["is_first"].dtype == np.bool_ and steps[0]["reward"].dtype == np.float32
    assert [float(s["reward"]) for s in steps] == [0.0, 1.0, 2.0]
    assert steps[1]["observation"]["natural_language_instruction"] == b"pick coke can"
    assert bool(ep["aspects"]["success"]) and not bool(ep["aspects"]["undesirable"])
    assert int(ep["attributes"]["env"]) == 7 and ep["attributes"]["env"].dtype == np.int64
    assert ep["attributes"]["env_name"] == b"kitchen" and ep["attributes"]["location_name"] == b"UNSPECIFIED"


def test_embedded_sample_declares_the_published_leaves(tmp_path):
    path = ensure_embedded_sample(tmp_path, num_episodes=1, steps=4, quiet=True)
    assert feature_leaves(json.loads((path / "features.json").read_text())) == published_leaves()
