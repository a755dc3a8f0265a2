"""One place for each thing: builders (datasets included), checkpoint kinds, step-info cleaning."""

import json

import numpy as np
import torch
from omegaconf import OmegaConf

from envs.backend import jsonable_info
from worldmodel import builders


def test_pretraining_datasets_and_streams_are_built_in_builders():
    d = OmegaConf.create({"name": "procedural", "seed": 0, "length": 10, "image_size": 16, "video_size": 8,
                          "video_frames": 2, "sample_rate": 8000, "audio_seconds": 0.1})
    image = builders.build_dataset(d, "image")
    assert len(image) == 10 and image[0]["image"].shape == (3, 16, 16)
    cfg = OmegaConf.create({"data": d, "modalities": {"image": {"prob": 1.0, "batch_size": 2},
                                                      "audio": {"prob": 0.0, "batch_size": 2}}})
    codec = builders.build_frames_codec(OmegaConf.create({"frames": "patch", "patch": 4, "frames_path": None}))
    streams = builders.build_streams(cfg, codec, None)
    assert [(s.modality, s.batch_size) for s in streams] == [("image", 2)]


def test_the_policy_reads_the_checkpoint_kind_fine_tuning_writes():
    from policies import selfflow_policy

    assert selfflow_policy.KIND is builders.FINETUNE_KIND


def test_jsonable_info_keeps_scalars_of_both_simulators():
    info = {"success": torch.tensor([True]), "elapsed_steps": np.array(3), "ratio": np.float32(0.5), "name": "x",
            "obs": np.zeros((2, 2)), "episode_stats": {"moved": np.bool_(False), "dist": 0.25, "img": object()}}
    out = jsonable_info(info)
    assert out == {"success": True, "elapsed_steps": 3, "ratio": 0.5, "name": "x",
                   "episode_stats": {"moved": False, "dist": 0.25}}
    json.dumps(out)
