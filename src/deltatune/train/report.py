"""What a run leaves behind besides the adapter: ``metrics.json`` and a plot of the training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deltatune.train.callbacks import History


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """JSON with NaN written as null, so any JSON reader accepts it."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    path.write_text(json.dumps(clean, indent=2) + "\n")


def plot_history(path: Path, history: History, headline: str, title: str) -> None:
    """Two panels: training loss per step (raw and smoothed), and validation metrics per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    steps = list(range(1, len(history.loss) + 1))
    left.plot(steps, history.loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="per step")
    window = max(1, len(history.loss) // 50)
    if len(history.loss) >= window > 1:
        smooth = [sum(history.loss[i - window:i]) / window for i in range(window, len(history.loss) + 1)]
        left.plot(steps[window - 1:], smooth, color="tab:blue", label=f"mean of {window}")
    left.set(xlabel="step", ylabel="training loss", title="training loss")
    left.legend(loc="upper right")

    epochs = [v["epoch"] for v in history.validation]
    if headline in (history.validation[0] if history.validation else {}):
        right.plot(epochs, [v[headline] for v in history.validation], "o-", color="tab:green",
                   label=f"validation {headline}")
        right.set_ylabel(f"validation {headline}")
    if history.validation and "loss" in history.validation[0]:
        twin = right.twinx() if headline != "loss" else right
        twin.plot(epochs, [v["loss"] for v in history.validation], "s--", color="tab:red", label="validation loss")
        twin.set_ylabel("validation loss")
    right.set(xlabel="epoch", title="validation")
    if epochs and all(float(e).is_integer() for e in epochs):
        right.set_xticks(epochs)
    handles = [h for ax in fig.axes[1:] for h in ax.get_lines()]
    if handles:
        right.legend(handles=handles, loc="lower right")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
