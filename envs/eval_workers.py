"""The evaluator's simulator worker processes (multiprocessing, spawn), each with its own env.

Each worker builds its backend and its policy from the policy spec it is given (with a shared policy
server that spec is a client of it, so N workers hold no model), runs its shard of the episodes, saves
each record atomically (envs.resume) and sends it to the parent. A worker whose parent died (kill -9)
stops before its next episode. No torch is imported here.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import traceback
from typing import Any

from envs.backend import EpisodeSpec
from envs.results import EpisodeRecord


def _worker(wid: int, spec_dicts: list[dict], cfg, policy_spec: dict[str, Any], parent: int, out_q) -> None:
    """Worker process: own backend, own policy; sends ("rec", dict) per episode, then ("done", wid)."""
    from envs.evaluator import build_backend, build_policy, run_and_save

    try:
        backend = build_backend(cfg)
        policy = build_policy(policy_spec)
    except Exception as e:  # noqa: BLE001
        out_q.put(("fatal", wid, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
        return
    for d in spec_dicts:
        if os.getppid() != parent:  # the evaluator is gone (killed): leave the rest to the rerun
            break
        out_q.put(("rec", wid, run_and_save(backend, policy, EpisodeSpec.from_dict(d), cfg).to_dict()))
    for obj in (policy, backend):
        if hasattr(obj, "close"):
            obj.close()
    out_q.put(("done", wid, None))


def run_parallel(specs: list[EpisodeSpec], cfg, policy_spec: dict[str, Any], bar) -> list[EpisodeRecord]:
    """Run `specs` round-robin over `cfg.workers` processes; returns their records in `specs` order."""
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    shards = [[s.to_dict() for s in specs[i::cfg.workers]] for i in range(cfg.workers)]
    procs = [ctx.Process(target=_worker, args=(i, shards[i], cfg, policy_spec, os.getpid(), out_q), daemon=True)
             for i in range(cfg.workers) if shards[i]]
    for p in procs:
        p.start()
    got: dict[int, EpisodeRecord] = {}
    fatal: dict[int, str] = {}
    done: set[int] = set()
    try:
        while len(done) + len(fatal) < len(procs):
            try:
                kind, wid, payload = out_q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in done and i not in fatal]
                for i in dead:  # died without a message (segfault, OOM kill)
                    try:  # drain what it may have sent just before dying
                        while True:
                            kind, wid, payload = out_q.get(timeout=0.5)
                            _handle(kind, wid, payload, got, fatal, done, bar)
                    except queue_mod.Empty:
                        pass
                    if i not in done and i not in fatal:
                        fatal[i] = f"worker {i} died with exit code {procs[i].exitcode}"
                continue
            _handle(kind, wid, payload, got, fatal, done, bar)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    records = []
    for n, s in enumerate(specs):
        if s.index in got:
            records.append(got[s.index])
        else:
            records.append(EpisodeRecord(s.task, s.protocol, s.variant, s.index, s.seed, None,
                                         error=fatal.get(n % cfg.workers, "episode never reported")))
    return records


def _handle(kind, wid, payload, got, fatal, done, bar) -> None:
    if kind == "rec":
        rec = EpisodeRecord(**payload)
        got[rec.index] = rec
        bar.update(1)
        if rec.success is None:
            bar.write(f"episode {rec.index} failed: {rec.error.splitlines()[0]}")
    elif kind == "fatal":
        fatal[wid] = payload
        bar.write(f"worker {wid} could not start: {payload.splitlines()[0]}")
    else:
        done.add(wid)
