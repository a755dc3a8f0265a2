"""The closing summary of a training run: each output file in the run folder and what it shows.

`scripts/pretrain.py` and `scripts/finetune_rt1.py` print `run_summary(output_dir)` when they finish, so a user
sees at a glance where to look; only files that exist are listed, in the order below.
"""

from __future__ import annotations

import json
from pathlib import Path

# (file or folder name, what it shows); the same table serves pretraining and fine-tuning runs.
OUTPUTS: tuple[tuple[str, str], ...] = (
    ("checkpoint/", "model weights (EMA) + config.json; fine-tuning: the policy (SelfFlowPolicy.from_pretrained); "
                    "train_state/ resumes the run"),
    ("offline_eval.json", "held-out episodes: action MAE per dimension against predicting the training mean"),
    ("predicted_vs_true.gif", "held-out windows: true future frames beside the frames the model predicts"),
    ("samples_image.png", "images sampled from noise for the captions in samples_image_captions.txt"),
    ("samples_video.gif", "video clips sampled from noise for the captions in samples_video_captions.txt"),
    ("samples_audio.wav", "audio clips sampled from noise, one after another (captions in samples_audio_captions.txt)"),
    ("loss_curves.png", "one panel per loss term (flow, rep, loss), one line per modality or training mode"),
    ("metrics.jsonl", "every logged step: losses, learning rate, gradient norm, steps/s (and eval/ metrics)"),
)


def headline(output_dir: str | Path) -> str | None:
    """One line with the fine-tuning result (translation MAE vs predict-the-mean), None without offline_eval.json."""
    path = Path(output_dir) / "offline_eval.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    dims = [d for d in ("x", "y", "z") if f"mae/{d}" in m and f"baseline_mae/{d}" in m]
    if not dims:
        return None
    mae = sum(m[f"mae/{d}"] for d in dims) / len(dims)
    base = sum(m[f"baseline_mae/{d}"] for d in dims) / len(dims)
    return (f"translation MAE {mae:.4f} vs predict-the-mean {base:.4f} ({mae / base:.2f} of the baseline) on "
            f"{m.get('steps_evaluated', '?')} held-out action steps")


def run_summary(output_dir: str | Path) -> str:
    """Text naming each output of the run in `output_dir` and what it shows (plus the fine-tuning headline)."""
    out = Path(output_dir)
    width = max(len(name) for name, _ in OUTPUTS)
    lines = [f"outputs in {out}:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in OUTPUTS if (out / name.rstrip("/")).exists()]
    logs = sorted(p.name for p in out.glob("*.log"))
    if logs:
        lines.append(f"  {', '.join(logs):<{width}}  the run's log")
    result = headline(out)
    if result:
        lines.append(f"result: {result}")
    return "\n".join(lines)


__all__ = ["OUTPUTS", "headline", "run_summary"]
