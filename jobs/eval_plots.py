"""The plots of jobs/evaluate.py: speedup against k, acceptance per offset, speedup against batch size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_all(result: dict, directory: str | Path) -> dict[str, Path]:
    """Draw every plot the result's speed section allows; return their paths by name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    speed, title = result["speed"], f"{result['model']}, {result['dtype']}, {result['device']}"
    across_k, across_batch = speed["across_k"], speed["across_batch"]
    paths = {}

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["k"] for r in across_k], [r["speedup"] for r in across_k], "o-", label="speedup")
    ax.plot([r["k"] for r in across_k], [r["tokens_per_forward"] for r in across_k], "s--", label="tokens per pass")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="k (SATs per draft)", ylabel="x plain greedy", title=f"Two-step SDSAT, batch 1\n{title}")
    ax.legend()
    paths["speedup_vs_k"] = _save(fig, directory / "speedup_vs_k.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in across_k:
        rates = r["accept_rate_per_offset"]
        ax.plot(range(1, len(rates) + 1), rates, "o-", label=f"k={r['k']}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="draft offset", ylabel="accepted / drafted", ylim=(0, 1.05), title=f"Acceptance per offset\n{title}")
    ax.legend(fontsize="small", ncol=2)
    paths["acceptance_per_offset"] = _save(fig, directory / "acceptance_per_offset.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["batch"] for r in across_batch], [r["speedup"] for r in across_batch], "o-")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size", ylabel="x plain greedy", title=f"Default decoder, k={across_batch[0]['k']}\n{title}")
    paths["speedup_vs_batch"] = _save(fig, directory / "speedup_vs_batch.png")
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
