"""What a training run leaves for the user: loss_curves.png by term and modality, and the closing summary."""

from __future__ import annotations

import json

from worldmodel.loss_plot import loss_panels, plot_loss_curves
from worldmodel.run_summary import run_summary


def test_loss_panels_put_each_term_in_its_own_panel_with_a_line_per_modality():
    keys = ["step", "flow", "rep", "flow/image", "rep/image", "flow/video", "loss", "loss/policy", "lr",
            "grad_norm", "steps_per_s", "eval/action_mae", "eval/mae/x"]
    assert loss_panels(keys) == {"flow": {"all": "flow", "image": "flow/image", "video": "flow/video"},
                                 "rep": {"all": "rep", "image": "rep/image"},
                                 "loss": {"all": "loss", "policy": "loss/policy"}}


def test_loss_curves_png_is_written_whole(tmp_path):
    records = [{"step": s, "flow": 1.0 / s, "flow/image": 1.1 / s, "rep/audio": -s / 10, "lr": 1e-3} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    png = plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "loss_curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curves.png", "metrics.jsonl"]


def test_run_summary_names_each_existing_output_and_the_result(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "loss_curves.png").write_bytes(b"")
    (tmp_path / "finetune_rt1.log").write_text("")
    text = run_summary(tmp_path)
    assert "checkpoint/" in text and "loss_curves.png" in text and "finetune_rt1.log" in text
    assert "samples_image.png" not in text and "result:" not in text
    metrics = {"steps_evaluated": 10, "mae/x": 0.01, "mae/y": 0.02, "mae/z": 0.03,
               "baseline_mae/x": 0.02, "baseline_mae/y": 0.04, "baseline_mae/z": 0.06}
    (tmp_path / "offline_eval.json").write_text(json.dumps(metrics))
    assert "result: translation MAE 0.0200 vs predict-the-mean 0.0400 (0.50 of the baseline) on 10" in run_summary(
        tmp_path)
