"""Resumable evaluation (kill -9, then the same command again) and one policy server shared by the workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import simpler_double  # noqa: E402

from envs.evaluator import EvalConfig, evaluate, shared_policy  # noqa: E402
from envs.policy_server_pool import shared_server_spec  # noqa: E402
from envs.resume import EpisodeStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BACKEND = "simpler_double:DoubleBackend"


def _cfg(out: Path, **kw) -> EvalConfig:
    base = dict(task="two_stage", protocol="visual_matching", backend=BACKEND, workers=1, video=False,
                output_dir=str(out), progress=False,
                policy={"kind": "factory", "target": "simpler_double:ScriptedPolicy", "kwargs": {"delay_s": 0.02}})
    base.update(kw)
    return EvalConfig(**base)


RUN = """
import sys
from envs.evaluator import EvalConfig, evaluate
evaluate(EvalConfig(**{cfg!r}))
"""


def _start(cfg: EvalConfig) -> subprocess.Popen:
    """The evaluation as its own process (its own session, so kill -9 reaches it and its workers' group)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", RUN.format(cfg=cfg.__dict__)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _files(out: Path) -> tuple[dict, str]:
    return json.loads((out / "summary.json").read_text())["results"], (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_killed_evaluation_resumes_to_the_uninterrupted_summary(tmp_path, workers):
    whole = evaluate(_cfg(tmp_path / "whole", workers=workers))
    out = tmp_path / "killed"
    proc = _start(_cfg(out, workers=workers, policy={"kind": "factory", "target": "simpler_double:ScriptedPolicy",
                                                     "kwargs": {"delay_s": 0.02}}))
    episodes = out / "episodes"
    deadline = time.monotonic() + 120
    while len(list(episodes.glob("*.json"))) < 2:  # wait for some records, then kill mid-run
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no episode recorded in 120 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.read_bytes() for p in episodes.glob("*.json")}
    assert 2 <= len(kept) < len(whole.records), "the kill must land mid-run"
    assert not (out / "summary.json").exists()
    (episodes / ".000005.json.999.tmp").write_text('{"half": ')  # what a kill during a write would leave

    resumed = evaluate(_cfg(out, workers=workers))
    assert resumed.timing["episodes_run"] == len(whole.records) - len(kept)  # only the missing ones ran
    assert all((episodes / name).read_bytes() == data for name, data in kept.items())  # finished ones kept
    assert _files(out) == _files(tmp_path / "whole")
    assert [(r.index, r.success, r.steps) for r in resumed.records] == [(r.index, r.success, r.steps)
                                                                        for r in whole.records]
    again = evaluate(_cfg(out, workers=workers))  # a finished run resumed: nothing to do, the same files
    assert again.timing["episodes_run"] == 0 and _files(out) == _files(tmp_path / "whole")


@pytest.mark.slow
def test_resume_matches_episodes_reruns_failed_ones_and_restarts_on_other_settings(tmp_path):
    evaluate(_cfg(tmp_path, episodes=2))
    res = evaluate(_cfg(tmp_path, episodes=4))  # more episodes: the two done are kept
    assert res.timing["episodes_run"] == 2 and len(res.records) == 4
    store = EpisodeStore(tmp_path)
    specs = simpler_double.DoubleBackend().episodes("two_stage", "visual_matching")
    record = store.finished(specs)[0]
    record.success, record.error = None, "simulated crash"
    store.save(record)  # a failed episode is not kept: the next run does it again
    res = evaluate(_cfg(tmp_path, episodes=4))
    assert res.timing["episodes_run"] == 1 and res.records[0].success is True
    with pytest.warns(RuntimeWarning, match=r"other settings \(ignore_terminate, rotation\).*runs again"):
        res = evaluate(_cfg(tmp_path, episodes=4, rotation="rpy", ignore_terminate=True))
    assert res.timing["episodes_run"] == 4
    assert json.loads((tmp_path / "run.json").read_text())["rotation"] == "rpy"
    res = evaluate(_cfg(tmp_path, episodes=4, rotation="rpy", ignore_terminate=True, resume=False))
    assert res.timing["episodes_run"] == 4  # resume=False starts afresh


def test_workers_share_one_policy_server(tmp_path):
    pid_file = tmp_path / "server_pids"
    command = [sys.executable, str(TESTS / "policy_server_double.py"), "--port", "{port}", "--pid-file", str(pid_file)]
    serial = evaluate(_cfg(tmp_path / "serial", policy={"kind": "factory", "target": "simpler_double:ScriptedPolicy"}))
    res = evaluate(_cfg(tmp_path / "shared", workers=3, policy={"kind": "serve", "command": command}))
    assert [(r.index, r.success) for r in res.records] == [(r.index, r.success) for r in serial.records]
    assert all(r.success for r in res.records)
    pids = pid_file.read_text().split()
    assert len(pids) == 1  # one server process for the three workers
    assert not Path(f"/proc/{pids[0]}").exists()  # stopped (and reaped) when the evaluation ended


def test_checkpoint_with_workers_becomes_one_served_policy(tmp_path):
    spec = {"kind": "checkpoint", "path": "/ckpt", "kwargs": {"device": "cpu", "execute_steps": 4}, "name": "x"}
    served = shared_server_spec(spec)
    assert served["command"][1:5] == ["-m", "policies.serve", "--checkpoint", "/ckpt"]
    assert served["command"][-2:] == ["--device", "cpu"] and "{port}" in served["command"]
    assert served["client_kwargs"] == {"execute_steps": 4}
    with pytest.raises(ValueError, match="sampling_steps.*workers=1"):
        shared_server_spec({"kind": "checkpoint", "path": "/ckpt", "kwargs": {"sampling_steps": 4}})
    with shared_policy(_cfg(tmp_path, workers=1, policy=spec)) as one:  # one worker keeps the model in-process
        assert one == spec


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_shared_server_dies_with_a_killed_evaluator(tmp_path):
    pid_file = tmp_path / "server_pids"
    script = (f"from envs.policy_server_pool import PolicyServerProcess\n"
              f"s = PolicyServerProcess({[sys.executable, str(TESTS / 'policy_server_double.py'), '--port', '{port}', '--pid-file', str(pid_file)]!r}).start()\n"  # noqa: E501
              "print('up', flush=True)\nimport time\ntime.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"up", proc.stderr.read().decode()
    server = int(pid_file.read_text().split()[0])
    assert Path(f"/proc/{server}").exists()
    proc.kill()  # kill -9: no cleanup code runs in the evaluator
    proc.wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{server}").exists() and "State:\tZ" not in _status(server):
        assert time.monotonic() < deadline, "the policy server outlived its killed evaluator"
        time.sleep(0.05)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "State:\tZ"  # gone between the two checks
