"""Per-episode records -> JSON/CSV, SimplerEnv-style aggregation, Wilson intervals, markdown tables.

Aggregation follows SimplerEnv's `calc_metrics_evaluation_videos.py`: each variant cell (urdf version
for visual matching; background / lighting / distractor / table variant for variant aggregation, per
coke-can orientation or drawer) is averaged over its episodes, then the task's rate is the mean of the
cell rates. The 95% Wilson interval is computed on the pooled successes over all episodes (n shown),
which matches the cell mean whenever cells have equal size, as in the official grids.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from envs.baselines import BASELINES, TASK_GROUPS, baseline


@dataclass
class EpisodeRecord:
    """Outcome of one episode. `success` is None when the episode failed with `error`."""

    task: str
    protocol: str
    variant: str
    index: int
    seed: int | None
    success: bool | None  # the task's success at the LAST step (SimplerEnv's rule; the headline rate)
    steps: int = 0
    success_once: bool | None = None  # success at any step (ManiSkill3 also reports it); None for failed runs
    instruction: str = ""
    final_instruction: str = ""
    terminated_by_policy: bool = False
    policy_time_s: float = 0.0  # time inside policy.step
    sim_time_s: float = 0.0  # time inside env.step
    setup_time_s: float = 0.0  # env build + reset + policy.reset
    video: str | None = None
    rotation: str = ""  # rotation convention the evaluator applied (policies.conventions), "policy" = the policy's own
    error: str | None = None
    final_info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text to a temporary sibling, then rename it over `path` (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (see `write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(data, indent=1, default=str))


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval for k successes out of n trials."""
    if n <= 0:
        raise ValueError(f"Wilson interval needs n > 0 episodes, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"successes k={k} must lie in [0, n={n}]")
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class Rate:
    """A success rate with its 95% Wilson interval over n episodes (k successes)."""

    rate: float
    k: int
    n: int
    ci_low: float
    ci_high: float

    def fmt(self) -> str:
        return f"{100 * self.rate:.1f} [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}] (n={self.n})"


def rate_of(successes: list[bool]) -> Rate:
    k, n = sum(bool(s) for s in successes), len(successes)
    lo, hi = wilson_interval(k, n)
    return Rate(k / n, k, n, lo, hi)


def aggregate(records: list[EpisodeRecord]) -> dict[str, dict[str, Any]]:
    """Group by (task, protocol): per-variant rates, the mean of variant rates, pooled k/n with Wilson CI.

    Raises ValueError if any record failed (success is None): a run with errors has no success rate.
    """
    failed = [r for r in records if r.success is None]
    if failed:
        raise ValueError(f"{len(failed)} episode(s) failed (e.g. {failed[0].task}#{failed[0].index}: "
                         f"{failed[0].error}); no success rate is reported for an incomplete run - fix and rerun")
    groups: dict[tuple[str, str], dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[(r.task, r.protocol)][r.variant].append(bool(r.success))
    out: dict[str, dict[str, Any]] = {}
    for (task, protocol), variants in sorted(groups.items()):
        per_variant = {v: rate_of(s) for v, s in sorted(variants.items())}
        pooled = rate_of([s for ss in variants.values() for s in ss])
        mean_rate = sum(r.rate for r in per_variant.values()) / len(per_variant)
        out[f"{task}/{protocol}"] = {
            "task": task, "protocol": protocol, "success_rate": mean_rate, "pooled": asdict(pooled),
            "episodes": pooled.n, "variants": {v: asdict(r) for v, r in per_variant.items()},
        }
    return out


def summary_rate(entry: dict[str, Any]) -> Rate:
    """The headline Rate of one aggregate entry (variant-mean rate, pooled Wilson interval and n)."""
    p = entry["pooled"]
    return Rate(entry["success_rate"], p["k"], p["n"], p["ci_low"], p["ci_high"])


def markdown_table(summary: dict[str, dict[str, Any]], policy_name: str = "ours") -> str:
    """Per-task, per-protocol success rates (%, 95% Wilson CI, n) beside the published baselines."""
    names = list(BASELINES)
    lines = [f"| task | protocol | {policy_name} | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]

    def cell(v):
        return "—" if v is None else f"{v:.1f}"

    rows = sorted(summary.values(), key=lambda e: (e["task"], e["protocol"]))
    for e in rows:
        base = [cell(baseline(b, e["task"], e["protocol"])) for b in names]
        lines.append(f"| {e['task']} | {e['protocol']} | {summary_rate(e).fmt()} | " + " | ".join(base) + " |")
    # SimplerEnv reports open and close drawer as one number: their mean.
    for protocol in sorted({e["protocol"] for e in rows}):
        both = [summary.get(f"{t}/{protocol}") for t in ("open_drawer", "close_drawer")]
        if all(both):
            mean = 100 * (both[0]["success_rate"] + both[1]["success_rate"]) / 2
            n = both[0]["episodes"] + both[1]["episodes"]
            base = [cell(BASELINES[b]["drawer"][protocol]) for b in names]
            lines.append(f"| drawer (open/close mean) | {protocol} | {mean:.1f} (n={n}) | " + " | ".join(base) + " |")
    lines.append("")
    lines.append("Rates in %: variant-averaged success as SimplerEnv computes it, [95% Wilson interval] on the "
                 "pooled episodes, n = episodes. Baselines: published numbers; the drawer baselines are the "
                 "open/close mean. Evaluations of one checkpoint by different groups differ by up to ~27 points.")
    return "\n".join(lines)


CSV_FIELDS = ["task", "protocol", "variant", "index", "seed", "success", "steps", "instruction",
              "final_instruction", "terminated_by_policy", "rotation", "policy_time_s", "sim_time_s", "setup_time_s",
              "video", "error"]


def write_results(records: list[EpisodeRecord], out_dir: str | Path, meta: dict[str, Any] | None = None,
                  policy_name: str = "ours", notes: list[str] | None = None) -> dict[str, Path]:
    """Write episodes.json, episodes.csv and, when every episode completed, summary.json and results.md
    (each atomically; `notes`: paragraphs under the table, e.g. the settings that ran). Returns the written
    paths. Failed runs still get their per-episode files (with the errors).
    """
    out = Path(out_dir)
    paths = {"episodes_json": out / "episodes.json", "episodes_csv": out / "episodes.csv"}
    write_json_atomic(paths["episodes_json"], {"meta": meta or {}, "episodes": [r.to_dict() for r in records]})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow(r.to_dict())
    write_text_atomic(paths["episodes_csv"], buf.getvalue())
    if any(r.success is None for r in records):
        return paths
    summary = aggregate(records)
    paths["summary_json"] = write_json_atomic(out / "summary.json", {"meta": meta or {}, "results": summary})
    text = "\n\n".join([markdown_table(summary, policy_name), *(notes or [])])
    paths["results_md"] = write_text_atomic(out / "results.md", text + "\n")
    return paths


def load_records(path: str | Path) -> list[EpisodeRecord]:
    """Read back episodes.json written by `write_results`."""
    data = json.loads(Path(path).read_text())
    return [EpisodeRecord(**d) for d in data["episodes"]]


__all__ = ["EpisodeRecord", "Rate", "aggregate", "load_records", "markdown_table", "rate_of", "summary_rate",
           "wilson_interval", "write_json_atomic", "write_results", "write_text_atomic", "TASK_GROUPS"]
