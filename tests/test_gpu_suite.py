"""benchmarks/gpu_suite.py without CUDA: the tiny smoke version runs every section and writes its JSON."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
torch.set_num_threads(1)


def test_smoke_suite_measures_every_section_and_writes_json(tmp_path, monkeypatch, capsys):
    import gpu_suite

    monkeypatch.setenv("WORLDMODEL_CACHE", str(tmp_path / "cache"))
    record = gpu_suite.run_suite(smoke=True, out=tmp_path / "suite.json", budget_s=600)
    assert json.loads((tmp_path / "suite.json").read_text()) == record
    assert record["mode"] == "smoke" and record["reference"]["chunk_ms_graph_b1"] == 18.1
    steps = [r for r in record["training"] if "ms_per_step" in r]
    assert {(r["objective"], r["batch"], r["tokens"]) for r in steps} == {
        (o, b, n) for o in ("plain", "selfflow") for b, n in gpu_suite.SMOKE["shapes"]}
    assert all(r["tokens_per_s"] > 0 and r["tflop_per_step"] > 0 for r in steps)
    assert len([r for r in record["training"] if "ratio" in r]) == len(gpu_suite.SMOKE["shapes"])
    assert [r["batch"] for r in record["policy"]] == gpu_suite.SMOKE["policy_batches"]
    assert all(r["ms_median"] > 0 for r in record["policy"])
    assert record["reader"][0]["windows_per_s"] > 0 and record["reader"][0]["training_consumes_windows_per_s"] > 0
    printed = capsys.readouterr().out
    assert "reference 1.25x" in printed and "windows/s" in printed


def test_a_spent_budget_skips_and_says_so(tmp_path):
    import gpu_suite

    record = gpu_suite.run_suite(smoke=True, out=tmp_path / "suite.json", budget_s=0)
    rows = record["training"] + record["policy"] + record["reader"]
    assert rows and all(r.get("skipped") == "time budget spent" for r in rows)
