"""loss_curves.png: one panel per loss term, one line per modality (or training mode), colours kept across panels.

A metrics key ``"term/group"`` (``flow/image``, ``rep/video``, ``loss/policy``) is drawn in the panel of ``term``
as the line of ``group``; a bare key (``flow``, ``rep``, ``loss``: the step's mean over its micro-batches) is the
panel's black "all" line. Bookkeeping (``lr``, ``steps_per_s``, ...) and offline evaluation (``eval/...``) are
not losses and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from worldmodel.media_io import write_atomic
from worldmodel.metrics_log import NOT_LOSSES, read_metrics

ALL = "all"  # line label of a term's bare key


def loss_panels(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """{term: {group: metrics key}} for the loss keys among `keys`, terms and groups in first-seen order."""
    panels: dict[str, dict[str, str]] = {}
    for key in keys:
        if key in NOT_LOSSES or key.startswith("eval/"):
            continue
        term, _, group = key.partition("/")
        panels.setdefault(term, {})[group or ALL] = key
    return panels


def plot_loss_curves(
    metrics_path: str | Path, png_path: str | Path, keys: Iterable[str] | None = None, title: str = "training loss"
) -> Path:
    """Write `png_path` from a metrics.jsonl: a panel per loss term, a line per modality; returns the path.

    keys: the metrics keys to draw (default: every loss key in the log). Written atomically (temp + rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if keys is None:
        seen: dict[str, None] = {}
        for r in records:
            seen.update(dict.fromkeys(r))
        keys = seen
    panels = loss_panels(keys)
    groups = sorted({g for lines in panels.values() for g in lines if g != ALL})
    palette = plt.get_cmap("tab10")
    colours = {g: palette(i % 10) for i, g in enumerate(groups)} | {ALL: "black"}
    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, (term, lines) in zip(axes.flat, panels.items()):
        for group in sorted(lines, key=lambda g: (g == ALL, g)):
            points = [(r["step"], r[lines[group]]) for r in records if r.get(lines[group]) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=group, color=colours[group], lw=1.8 if group == ALL else 1.2,
                        marker="." if len(points) < 30 else None)
        ax.set_title(term)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return write_atomic(png_path, fig.savefig)
    finally:
        plt.close(fig)


__all__ = ["plot_loss_curves", "loss_panels"]
