"""Policies the policy and server tests share: a tiny random SelfFlowPolicy and a deterministic numpy LinePolicy."""

import time

import numpy as np
import torch
from omegaconf import OmegaConf

from policies.selfflow_policy import SelfFlowPolicy
from worldmodel.action_modes import ACTION_TOKEN_DIM
from worldmodel.actions import ActionNormalizer
from worldmodel.builders import build_frames_codec, build_text
from worldmodel.config import compose
from worldmodel.sizes import build_model

H = 4  # horizon of configs/finetune_rt1.yaml
INSTR = "pick coke can"


def _run_cfg() -> dict:
    """configs/finetune_rt1.yaml as a plain dict, with small text settings (what the fine-tuning run stores)."""
    cfg = OmegaConf.to_container(compose("finetune_rt1"))  # the composed recipe
    cfg.pop("hydra", None)
    cfg.pop("defaults", None)
    cfg["model"] = {"size": "tiny", "overrides": {}}
    cfg["text"].update(dim=64, layers=1, max_len=32)
    return cfg


def _make_policy(**options) -> SelfFlowPolicy:
    torch.manual_seed(0)
    run = _run_cfg()
    codec = build_frames_codec(OmegaConf.create(run["codec"]))
    text = build_text(OmegaConf.create(run["text"])).eval()
    model = build_model("tiny", token_dim={"video": codec.token_dim, "action": ACTION_TOKEN_DIM},
                        text_dim=text.feature_dim).eval()
    normalizer = ActionNormalizer(q01=[-0.05, -0.05, -0.05, -0.2, -0.2, -0.2], q99=[0.05, 0.05, 0.05, 0.2, 0.2, 0.2])
    return SelfFlowPolicy(model, text, codec, normalizer, run, device="cpu", **options)


def _image(shape=(256, 320, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _count_chunks(policy: SelfFlowPolicy) -> list:
    """Wrap the policy's batched chunk sampler; the returned list gets each sampling call's batch size."""
    calls, original = [], policy._sample_chunks

    def counting(context, *args, **kwargs):
        calls.append(context.shape[0])
        return original(context, *args, **kwargs)

    policy._sample_chunks = counting
    return calls


class LinePolicy:
    """actions[j, d] = mean(image)/255 + 0.01*j + 0.1*d + 1e-3*seed; terminate on row 1 if told 'stop'."""

    metadata = {"model_kind": "test-line", "horizon": H, "action_dim": 7, "image_size": [32, 40]}

    def __init__(self, tuple_output=True):
        self.calls, self.resets, self.tuple_output = 0, 0, tuple_output

    @staticmethod
    def expected(obs):
        base = obs["image"].mean() / 255.0 + 1e-3 * (obs.get("seed") or 0)
        actions = (base + 0.01 * np.arange(H)[:, None] + 0.1 * np.arange(7)[None]).astype(np.float32)  # (H, 7)
        terminate = np.zeros(H, np.float32)
        if obs["instruction"] == "stop":
            terminate[1] = 1.0
        return actions, terminate

    def predict_action_chunk(self, obs):
        assert obs["image"].flags.writeable
        if obs["instruction"] == "explode":
            raise RuntimeError("boom in the policy")
        if obs["instruction"] == "bad shape":
            return np.zeros((H, 6))
        self.calls += 1
        time.sleep(0.002)
        actions, terminate = self.expected(obs)
        return (actions, terminate) if self.tuple_output else actions

    def reset(self):
        self.resets += 1
