"""benchmarks/gpu_suite.py without CUDA: the tiny smoke version runs every section and writes its JSON."""

import json

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def gpu_suite(load_script):
    return load_script("gpu_suite", "benchmarks")


@pytest.mark.slow
def test_smoke_suite_measures_every_section_and_writes_json(gpu_suite, tmp_path, monkeypatch, capsys):
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


def test_a_spent_budget_skips_and_says_so(gpu_suite, tmp_path):
    record = gpu_suite.run_suite(smoke=True, out=tmp_path / "suite.json", budget_s=0)
    rows = record["training"] + record["policy"] + record["reader"]
    assert rows and all(r.get("skipped") == "time budget spent" for r in rows)


@pytest.mark.slow
def test_a_failing_measurement_is_recorded_and_the_others_still_run(gpu_suite, tmp_path, monkeypatch, capsys):
    def broken(opts):
        if opts["objective"] == "selfflow":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing" + "\nmore" * 5000)
        return real(opts)

    real = gpu_suite.run_one
    monkeypatch.setattr(gpu_suite, "run_one", broken)
    monkeypatch.setattr(gpu_suite, "reader_rate", lambda plan, rows: {"windows_per_s": 1.0, "windows": 1,
                                                                      "threads": 1, "fastest_selfflow_step": None,
                                                                      "training_consumes_windows_per_s": None})
    out = tmp_path / "suite.json"
    with pytest.raises(SystemExit) as exit_info:
        gpu_suite.main(["--smoke", "--out", str(out), "--budget-s", "600"])
    assert exit_info.value.code == 1
    record = json.loads(out.read_text())
    failed = [r for r in record["training"] if "error" in r]
    assert record["complete"] and record["errors"] == len(failed) == len(gpu_suite.SMOKE["shapes"])
    assert all(r["error"] == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
               and "selfflow" in r["name"] for r in failed)
    assert len([r for r in record["training"] if "ms_per_step" in r]) == len(gpu_suite.SMOKE["shapes"])
    assert not [r for r in record["training"] if "ratio" in r]  # no ratio from a failed step, never a 0
    assert [r["batch"] for r in record["policy"]] == gpu_suite.SMOKE["policy_batches"]  # later sections ran
    printed = capsys.readouterr()
    assert "ERROR RuntimeError" in printed.out
    tracebacks = printed.err.count("Traceback (most recent call last)")
    assert tracebacks == len(failed) and len(printed.err) < tracebacks * (gpu_suite.TRACEBACK_CHARS + 100)


def test_the_json_is_written_after_every_measurement(gpu_suite, tmp_path, monkeypatch):
    """A run killed from outside (the 8-minute limit) keeps what it measured."""
    seen = []

    def row(opts):
        if seen:  # the second measurement: the file already holds the first
            seen.append(json.loads((tmp_path / "suite.json").read_text()))
            raise KeyboardInterrupt  # not an Exception: stops the suite as a kill would
        seen.append(opts)
        return {"objective": opts["objective"], "batch": opts["batch"], "ms_per_step": 1.0, "tokens_per_s": 1.0,
                "mfu": None, "peak_mem_mb": 0.0}

    monkeypatch.setattr(gpu_suite, "run_one", row)
    with pytest.raises(KeyboardInterrupt):
        gpu_suite.run_suite(smoke=True, out=tmp_path / "suite.json", budget_s=600)
    partial = seen[1]
    assert not partial["complete"] and [r["objective"] for r in partial["training"]] == ["plain"]


def test_the_budget_skips_a_measurement_longer_than_the_time_left(gpu_suite):
    budget = gpu_suite.Budget(100.0)
    rows = []
    assert not budget.spent("first compiled", rows, print, kind="compiled")  # nothing known yet: it runs
    budget.took("compiled", 150.0)
    assert budget.spent("second compiled", rows, print, kind="compiled")  # would overrun the limit
    assert not budget.spent("eager", rows, print, kind="eager")
    assert rows == [{"name": "second compiled", "skipped": "time budget spent"}]
    guessed = gpu_suite.Budget(100.0, {"graph": 120.0})
    assert guessed.spent("graph", [], print, kind="graph") and not guessed.spent("eager", [], print, kind="eager")


def test_mfu_peak_matches_the_board_not_just_the_chip(load_script):
    peak_bf16_flops = load_script("bench_backbone", "benchmarks").peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H200 NVL") == peak_bf16_flops("NVIDIA H100 NVL") == 835e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") is None and peak_bf16_flops("cpu") is None
