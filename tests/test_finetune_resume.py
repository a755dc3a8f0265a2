"""Fine-tuning interrupted at a checkpoint and resumed reproduces the uninterrupted run loss for loss: the resumed
run continues the same data stream (the same windows, modes, noise and dropout) from where the checkpoint left it."""

import json

import pytest
import torch

from tests.test_pipelines import config

torch.set_num_threads(1)
COMMON = [
    "device=cpu", "trainer.max_steps=4", "trainer.warmup_steps=1", "trainer.progress=false", "trainer.log_every=1",
    "trainer.checkpoint_every=2", "trainer.eval_every=2", "data.synthetic_episodes=6", "data.synthetic_steps=8",
    "data.batch_size=2", "data.shuffle_buffer=8", "data.eval_fraction=0.34", "eval.batches=1",
    "eval.sampling_steps=2", "eval.video=false", "modes.joint=0.4", "modes.video=0.3",
]


class Interrupt(Exception):
    pass


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.mark.slow
def test_interrupted_and_resumed_finetuning_equals_uninterrupted(tmp_path, monkeypatch):
    from worldmodel.finetune import run_finetuning

    monkeypatch.setenv("WORLDMODEL_CACHE", str(tmp_path / "cache"))
    run_finetuning(config("finetune_rt1", COMMON), tmp_path / "straight")

    def stop_at_2(trainer, step):
        if step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_finetuning(config("finetune_rt1", COMMON), tmp_path / "resumed", callbacks=[stop_at_2])
    assert [s for s, _ in _losses(tmp_path / "resumed")] == [1, 2]
    run_finetuning(config("finetune_rt1", COMMON), tmp_path / "resumed")  # resume: auto, from the step-2 checkpoint

    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert [s for s, _ in straight] == [s for s, _ in resumed] == [1, 2, 3, 4]
    assert [loss for _, loss in resumed] == [loss for _, loss in straight]  # bitwise on CPU
