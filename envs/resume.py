"""Resumable evaluation: one atomically written record per finished episode, reread on the next run.

Layout under the evaluation's output dir:
    run.json                 the settings that decide the episodes' outcomes (task, protocol, policy, ...)
    episodes/<index>.json    one `EpisodeRecord` per finished episode (temp file + rename: whole or absent)
A run killed at any moment (kill -9 included) and started again with the same settings and output dir
keeps every recorded episode, runs only the missing (or failed) ones, and writes the same summary as an
uninterrupted run. Records are matched episode by episode (task, protocol, variant, index, seed), so asking for
more episodes than before keeps the ones done. A dir holding a run with other settings (another checkpoint,
rotation convention...) is started afresh, with a warning naming what changed. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envs.backend import EpisodeSpec
from envs.results import EpisodeRecord, write_json_atomic

RUN_FILE = "run.json"
EPISODE_DIR = "episodes"


class EpisodeStore:
    """The per-episode records of one evaluation in `out_dir` (see the module docstring)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.episode_dir = self.out_dir / EPISODE_DIR

    def claim(self, settings: dict[str, Any]) -> list[str]:
        """Record `settings` in run.json. An earlier run here with other settings is forgotten (its records would
        not describe this run); returns the names of the settings that changed ([] when none or no earlier run).

        `settings` must be JSON-like and hold only what decides the outcomes (not worker counts or progress bars).
        """
        path = self.out_dir / RUN_FILE
        settings = json.loads(json.dumps(settings, default=str))  # the form it takes on disk
        changed: list[str] = []
        if path.is_file():
            old = json.loads(path.read_text())
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if not changed:
                return []
            self.clear()
        write_json_atomic(path, settings)
        return changed

    def clear(self) -> None:
        """Forget an earlier run here (its run.json and per-episode records; videos are overwritten as they come)."""
        for path in [self.out_dir / RUN_FILE, *self.episode_dir.glob("*.json")]:
            path.unlink(missing_ok=True)

    def path(self, index: int) -> Path:
        return self.episode_dir / f"{index:06d}.json"

    def save(self, record: EpisodeRecord) -> Path:
        """Write one finished episode's record atomically."""
        return write_json_atomic(self.path(record.index), record.to_dict())

    def finished(self, specs: list[EpisodeSpec]) -> dict[int, EpisodeRecord]:
        """Records of `specs` already completed here (failed episodes are left out: they run again)."""
        done: dict[int, EpisodeRecord] = {}
        for s in specs:
            path = self.path(s.index)
            if not path.is_file():
                continue
            rec = EpisodeRecord(**json.loads(path.read_text()))
            same = (rec.task, rec.protocol, rec.variant, rec.index, rec.seed) == (s.task, s.protocol, s.variant,
                                                                                  s.index, s.seed)
            if not same:
                raise ValueError(f"{path} records episode {rec.task}/{rec.protocol} #{rec.index} ({rec.variant}, seed "
                                 f"{rec.seed}), not the one this run has under that index ({s.variant}, seed "
                                 f"{s.seed}); choose a new output dir")
            if rec.success is not None:
                done[s.index] = rec
        return done
