"""The training curve of a run: loss and per-offset SAT accuracy against steps, as a PNG and
as JSON lines (one per step), written beside the run's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

CURVE_FILE = "training_curve.png"
METRICS_FILE = "metrics.jsonl"


def write_curve(history: list[dict], directory: Path) -> Path:
    """``history``: per-step metrics (step, loss, sat_acc_<i>, and val_* where evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("no training steps to plot")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
    steps = [m["step"] for m in history]
    evaluated = [m for m in history if "val_loss" in m]
    offsets = sorted(int(key.rsplit("_", 1)[1]) for key in history[-1] if key.startswith("sat_acc_"))
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    loss_ax.plot(steps, [m["loss"] for m in history], lw=0.8, label="train")
    if evaluated:
        loss_ax.plot([m["step"] for m in evaluated], [m["val_loss"] for m in evaluated], "o-", label="validation")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    for i in offsets:
        line, = acc_ax.plot(steps, [m[f"sat_acc_{i}"] for m in history], lw=0.6, alpha=0.6, label=f"offset {i}")
        if evaluated:
            acc_ax.plot([m["step"] for m in evaluated], [m[f"val_sat_acc_{i}"] for m in evaluated], "o-",
                        color=line.get_color(), label=f"offset {i} (validation)")
    acc_ax.set(xlabel="step", ylabel="top-1 accuracy", title="SAT accuracy per offset", ylim=(0, 1))
    acc_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = directory / CURVE_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
