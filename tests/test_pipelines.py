"""End to end at toy scale: pretrain -> files a person can look at -> fine-tune from it -> a policy that acts."""


import imageio.v3 as iio
import numpy as np
import pytest
import torch

from worldmodel.media_io import read_wav

torch.set_num_threads(1)


def config(name: str, overrides: list[str]):
    from worldmodel.config import compose

    return compose(name, overrides)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from worldmodel.pretrain import run_pretraining

    out = tmp_path_factory.mktemp("pretrain")
    cfg = config("pretrain", [
        "trainer.max_steps=4", "trainer.warmup_steps=1", "trainer.progress=false", "trainer.log_every=1",
        "modalities.image.batch_size=4", "modalities.video.batch_size=2", "modalities.audio.batch_size=2",
        "sampling.steps=2", "sampling.num_samples=4", "device=cpu",
    ])
    result = run_pretraining(cfg, out)
    return out, result


def test_pretraining_writes_samples_curves_and_a_checkpoint(pretrained):
    out, result = pretrained
    assert np.isfinite(result["final_loss"])
    image = iio.imread(out / "samples_image.png")
    assert image.ndim == 3 and image.shape[-1] == 3 and image.shape[0] > 32  # a grid of 4 upscaled 32x32 samples
    video = iio.imread(out / "samples_video.gif", index=None)
    assert video.ndim == 4 and video.shape[0] == 4  # 4 frames (data.video_frames)
    audio, rate = read_wav(out / "samples_audio.wav")
    assert rate == 8000 and len(audio) >= 0.5 * 8000 and np.abs(audio).max() <= 1.0
    assert (out / "loss_curves.png").exists() and (out / "metrics.jsonl").exists()
    assert (out / "checkpoint" / "config.json").exists() and (out / "checkpoint" / "model.safetensors").exists()


def test_pretraining_resumes_to_the_same_losses(pretrained, tmp_path):
    """Stopping at step 2 and resuming gives the same step-3/4 losses as the uninterrupted run."""
    import json

    from worldmodel.pretrain import run_pretraining

    out, _ = pretrained
    straight = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    common = ["trainer.warmup_steps=1", "trainer.progress=false", "trainer.log_every=1",
              "modalities.image.batch_size=4", "modalities.video.batch_size=2", "modalities.audio.batch_size=2",
              "sampling.steps=2", "sampling.num_samples=4", "device=cpu"]
    run_pretraining(config("pretrain", ["trainer.max_steps=2", *common]), tmp_path)
    run_pretraining(config("pretrain", ["trainer.max_steps=4", *common]), tmp_path)  # resume: auto
    resumed = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.needs_tf
def test_finetuning_starts_from_pretraining_and_yields_a_policy(pretrained, tmp_path, monkeypatch):
    from policies import SelfFlowPolicy
    from worldmodel.checkpoint import load_checkpoint
    from worldmodel.finetune import run_finetuning

    monkeypatch.setenv("WORLDMODEL_CACHE", str(tmp_path / "cache"))
    pre_dir = pretrained[0] / "checkpoint"
    cfg = config("finetune_rt1", [
        f"init_from={pre_dir}", "trainer.max_steps=2", "trainer.warmup_steps=1", "trainer.progress=false",
        "data.synthetic_episodes=6", "data.synthetic_steps=8", "data.batch_size=4", "data.shuffle_buffer=16",
        "data.eval_fraction=0.2", "eval.batches=1", "eval.sampling_steps=2", "device=cpu", "trainer.lr=1e-12",
    ])
    result = run_finetuning(cfg, tmp_path / "run")
    assert {"action_mae", "mean_baseline_mae", "gripper_sign_accuracy", "terminate_accuracy"} <= set(
        result["offline_eval"])
    assert (tmp_path / "run" / "predicted_vs_true.gif").exists()
    # with a vanishing learning rate the shared backbone still holds the pretrained weights
    pre = load_checkpoint(pre_dir).weights["model"]
    fine = load_checkpoint(result["checkpoint"]).weights["model"]
    key = "double_blocks.0.media.qkv.weight" if "double_blocks.0.media.qkv.weight" in pre else sorted(
        k for k in pre if k.startswith("double_blocks.0"))[0]
    assert torch.allclose(pre[key], fine[key], atol=1e-6)
    assert fine["inputs.action.weight"].shape[1] == 8  # the new action head: 7 action dims + terminate
    policy = SelfFlowPolicy.from_pretrained(result["checkpoint"], device="cpu", seed=0)
    policy.reset("move the gripper to the red block")
    raw, action = policy.step(np.zeros((256, 320, 3), np.uint8))
    assert action["world_vector"].shape == (3,) and action["rot_axangle"].shape == (3,)
    assert set(raw) == {"world_vector", "rotation_delta", "gripper", "terminate_episode"}


def test_finetuning_refuses_a_pretraining_checkpoint_of_another_size(pretrained, tmp_path):
    from worldmodel.finetune import run_finetuning

    cfg = config("finetune_rt1", [f"init_from={pretrained[0] / 'checkpoint'}", "model=small", "device=cpu"])
    with pytest.raises(ValueError, match="set model=tiny"):
        run_finetuning(cfg, tmp_path)


def test_config_typos_are_named():
    with pytest.raises(Exception, match="max_step"):
        config("pretrain", ["trainer.max_step=3"])
    with pytest.raises(Exception, match="modell|model"):
        config("pretrain", ["model=tiniest"])


@pytest.mark.parametrize("objective", ["selfflow", "flow_matching"])
def test_finetuning_trains_actions_at_noisier_times_with_either_objective(objective):
    from worldmodel.builders import selfflow_config

    sf = selfflow_config(config("finetune_rt1", [f"objective={objective}"]).objective, 0.999, True)
    assert sf.modality_shift == {"action": 7.4} and sf.enabled == (objective == "selfflow")
    assert selfflow_config(config("pretrain", [f"objective={objective}"]).objective, 0.999, True).modality_shift == {}
