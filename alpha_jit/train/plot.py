"""The loss-curve PNG written at the end of training.

One picture answers "did it learn?": the train loss per step as a line, the validation loss at
each eval as points, and optionally the unigram entropy as the bar a context-free model would
reach. It reads the same JSONL that `MetricsLog` writes (or rows in memory), draws with
matplotlib's Agg canvas (no display, no pyplot global state) and writes the PNG atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from alpha_jit.train.atomic import atomic_path
from alpha_jit.train.metrics import MetricsError, read_metrics


def _points(rows: list[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v, step = r.get(key), r.get("step")
        if isinstance(v, (int, float)) and isinstance(step, (int, float)) and math.isfinite(v):
            xs.append(float(step))
            ys.append(float(v))
    return xs, ys


def plot_loss_curve(
    source: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    png_path: str | os.PathLike[str],
    *,
    train_key: str = "loss",
    val_key: str = "val_loss",
    entropy: float | None = None,
    title: str | None = None,
) -> Path:
    """Draw `train_key` and `val_key` against `step` from a JSONL path or rows; returns the PNG.

    Rows without a finite value for a key are left out of that series (NaN never plots).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(source, (str, os.PathLike)):
        rows = read_metrics(source)
        name = Path(source).name
    else:
        rows = list(source)
        name = "metrics"
    tx, ty = _points(rows, train_key)
    vx, vy = _points(rows, val_key)
    if not tx and not vx:
        raise MetricsError(f"{name}: no rows with 'step' and '{train_key}' or '{val_key}' to plot")

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if tx:
        ax.plot(tx, ty, linewidth=1.0, label=f"train ({train_key})")
    if vx:
        ax.plot(vx, vy, "o-", markersize=4, label=f"val ({val_key})")
    if entropy is not None:
        ax.axhline(entropy, color="gray", linestyle="--", linewidth=1.0, label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()

    dest = Path(png_path).expanduser()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return dest
