"""`torchrun --nproc_per_node 2` of the real entry points on CPU (gloo): FSDP2 and DDP runs reach and pass their
end-of-run evaluation / sampling (rank 0 evaluates; the other rank must not hang or return early)."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_FINETUNE = [
    "device=cpu", "trainer.max_steps=2", "trainer.warmup_steps=1", "trainer.progress=false", "trainer.log_every=1",
    "data.synthetic_episodes=6", "data.synthetic_steps=8", "data.batch_size=2", "data.shuffle_buffer=8",
    "data.eval_fraction=0.34", "eval.batches=1", "eval.sampling_steps=2", "eval.video=false",
]
TINY_PRETRAIN = [
    "device=cpu", "trainer.max_steps=2", "trainer.warmup_steps=1", "trainer.progress=false", "trainer.log_every=1",
    "modalities.image.batch_size=2", "modalities.video.batch_size=1", "modalities.audio.batch_size=1",
    "sampling.steps=2", "sampling.num_samples=4",
]


pytestmark = pytest.mark.slow  # 2-process torchrun runs: 6-11 s each


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: str, run_dir: Path, overrides: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WORLDMODEL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "scripts" / script), f"hydra.run.dir={run_dir}", *overrides]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{script} with 2 processes hung (no exit in 600 s):\n{err.stderr}") from err
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp2", "ddp"])
def test_two_process_finetuning_finishes_with_its_offline_evaluation(tmp_path, fsdp):
    run = tmp_path / "run"
    _torchrun("finetune_rt1.py", run, [*TINY_FINETUNE, f"trainer.fsdp={str(fsdp).lower()}"], tmp_path)
    result = json.loads((run / "offline_eval.json").read_text())
    assert result["step"] == 2 and math.isfinite(result["action_mae"]) and math.isfinite(result["mean_baseline_mae"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert any("eval/action_mae" in r for r in records)
    assert (run / "checkpoint" / "model.safetensors").exists()
    state = json.loads((run / "checkpoint" / "train_state" / "state.json").read_text())
    assert state["rng_ranks"] == 2 and state["meta"]["world_size"] == 2


def test_two_process_fsdp_pretraining_finishes_with_its_samples(tmp_path):
    run = tmp_path / "run"
    _torchrun("pretrain.py", run, [*TINY_PRETRAIN, "trainer.fsdp=true"], tmp_path)
    assert (run / "samples_image.png").stat().st_size > 0 and (run / "samples_audio.wav").exists()
    assert (run / "checkpoint" / "model.safetensors").exists()
