"""Training metrics: a JSONL log (always), TensorBoard / Weights & Biases (optional); the PNG: worldmodel/loss_plot.py.

One line of ``metrics.jsonl`` per logged step: ``{"step": 10, "loss": 0.91, "flow/image": 0.88, "lr": 1e-4}``.
Keys that appear only on some steps (``flow/video`` in a mixed-modality run) are simply absent elsewhere;
the plot draws each key over the steps where it exists.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

# Bookkeeping keys that are not losses: logged, but left out of the default loss plot.
NOT_LOSSES = frozenset({"step", "lr", "grad_norm", "steps_per_s", "samples_per_s", "time_s", "ema_decay"})


class MetricsLogger:
    """Appends metrics to ``<output_dir>/metrics.jsonl``; mirrors them to TensorBoard / wandb when asked.

    Only the main process should log: ``enabled=False`` makes every call a no-op (other ranks).
    """

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        run_config: Mapping | None = None,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard "
                                 "(or set tensorboard=false)") from err
            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("wandb_project is set but wandb is not installed: pip install wandb "
                                 "(or set wandb_project=null)") from err
            self._wandb = wandb.init(project=wandb_project, dir=str(output_dir), config=dict(run_config or {}))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append one record; values must be numbers (non-finite ones are written as null)."""
        if not self.enabled:
            return
        record = {"step": int(step)}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else None
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites the steps after its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def reset(self) -> None:
        """Empty the log (a run starting fresh in a folder that holds an earlier run's metrics.jsonl)."""
        if self.enabled and self.path.exists():
            self.path.write_text("")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file, in order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no metrics log at {path}: train with log_every > 0 first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["MetricsLogger", "read_metrics", "NOT_LOSSES"]
