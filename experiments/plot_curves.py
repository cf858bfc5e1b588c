"""Learning curves of several runs on one figure, against forward passes (issue 18).

    python experiments/plot_curves.py --out experiments/figures/curves.png \
        absolute=/tmp/curves/full-absolute:2 relative=/tmp/curves/full-relative:2 \
        sgd=/tmp/curves/sgd:3

Each run is ``LABEL=RUN_DIR[:FORWARDS_PER_STEP]``: ZO-SGD and its variants cost two forward
passes a step; a first-order step costs about three forward-pass equivalents (forward plus a
backward of about twice its cost), so runs on one budget of forward passes line up on the
x axis. The top panel is the training loss (a moving average over ``--window`` steps), the
bottom one the dev score at each evaluation (the zero-shot score at 0). A table of the same
numbers is printed for experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zo.trajectory import read_jsonl


def parse_run(text: str) -> tuple[str, Path, float]:
    label, sep, rest = text.partition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"expected LABEL=RUN_DIR[:FORWARDS], got {text!r}")
    path, _, forwards = rest.partition(":")
    run = Path(path)
    if not (run / "metrics.jsonl").is_file():
        raise argparse.ArgumentTypeError(f"{run} has no metrics.jsonl: is it a run directory?")
    return label, run, float(forwards or 2)


def moving_average(values: list[float], window: int) -> list[float]:
    averaged, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        averaged.append(total / min(i + 1, window))
    return averaged


def read_curve(run: Path) -> tuple[list[int], list[float], list[tuple[int, float]]]:
    """(steps, training losses, [(step, dev score)]) with the zero-shot score at step 0.

    Steps are counted as the progress bar counts them (the first update is step 1), whatever
    numbering the run's metrics.jsonl uses: lines are numbered by their order.
    """
    steps, losses, scores = [], [], []
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if summary.get("zero_shot_score") is not None:
        scores.append((0, summary["zero_shot_score"]))
    for line in read_jsonl(run / "metrics.jsonl"):
        if "loss" not in line:
            if "dev_score" in line and line.get("step") == 0:
                scores[:1] = [(0, line["dev_score"])]
            continue
        steps.append(len(steps) + 1)
        losses.append(line["loss"])
        if "dev_score" in line:
            scores.append((steps[-1], line["dev_score"]))
    if summary.get("final_score") is not None and steps and scores[-1][0] != steps[-1]:
        scores.append((steps[-1], summary["final_score"]))
    return steps, losses, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=parse_run, help="LABEL=RUN_DIR[:FORWARDS]")
    parser.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    parser.add_argument("--window", type=int, default=50, help="moving-average steps")
    parser.add_argument("--title", default="", help="the figure's title")
    options = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, score_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    print("| run | steps | forward passes | training loss, first -> last window | dev score |")
    print("|---|---|---|---|---|")
    for label, run, forwards in options.runs:
        steps, losses, scores = read_curve(run)
        if not steps:
            print(f"| {label} | 0 | 0 | (no logged step) | |")
            continue
        averaged = moving_average(losses, options.window)
        loss_axis.plot([s * forwards for s in steps], averaged, label=label)
        score_axis.plot(
            [s * forwards for s, _ in scores], [v for _, v in scores], "o-", label=label
        )
        window = min(options.window, len(losses))
        first = sum(losses[:window]) / window
        last = sum(losses[-window:]) / window
        trail = " -> ".join(f"{v:.3f}@{s}" for s, v in scores)
        print(
            f"| {label} | {steps[-1]} | {steps[-1] * forwards:.0f} "
            f"| {first:.3f} -> {last:.3f} | {trail} |"
        )
    loss_axis.set_ylabel(f"training loss ({options.window}-step mean)")
    score_axis.set_ylabel("dev score")
    score_axis.set_xlabel("forward passes (forward-pass equivalents for first-order)")
    loss_axis.legend(fontsize=8)
    if options.title:
        loss_axis.set_title(options.title, fontsize=9)
    figure.tight_layout()
    options.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(options.out, dpi=100)
    print(f"figure: {options.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
