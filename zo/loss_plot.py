"""``loss.png`` of a run directory: per-step training loss and its running mean."""

from __future__ import annotations

from pathlib import Path

from zo.run_directory import RunDirectory


def plot_loss(run: RunDirectory) -> Path:
    """loss.png: per-step training loss and its running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run.step_records()
    steps = [r["step"] + 1 for r in records]  # record n is update n + 1: count as the bar does
    losses = [r["loss"] for r in records]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, losses, alpha=0.3, label="loss")
    axis.plot(steps, smooth, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.legend()
    figure.tight_layout()
    tmp = run.plot.with_name(".loss.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(run.plot)
    return run.plot
