"""``metrics.jsonl``: a run's logged numbers, counted as the progress bar counts them.

Format 2 (``metrics_format: 2`` in the trajectory header): step 0 is the model before any
update (its zero-shot dev score, when ``train.eval_before``), step ``n`` the model after
``n`` updates, as the progress bar, TensorBoard and ``metrics.csv`` show them. Runs written
before (no ``metrics_format`` in the header: format 1) numbered a line by the index of the
update it followed (``n - 1``) and had no zero-shot line; they are still read, and a resumed
one keeps writing its own format so that a file never mixes the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zo.reporting import Reporters
from zo.run_directory import RunDirectory, metrics_format
from zo.run_files import read_jsonl


class MetricsLog:
    """Writes metrics.jsonl in the run's own format, and the same numbers to the reporters."""

    def __init__(self, run: RunDirectory, reporters: Reporters) -> None:
        self.run, self.reporters = run, reporters

    def zero_shot(self, score: float) -> None:
        """Step 0: the dev score before any update (format 1 files have no such line)."""
        if self.run.metrics_format >= 2:
            self.run.append(self.run.metrics, {"step": 0, "dev_score": score})
        self.reporters.log(0, {"dev_score": score})

    def step(self, done: int, values: dict[str, Any]) -> None:
        """The numbers logged after ``done`` updates."""
        logged = done if self.run.metrics_format >= 2 else done - 1
        self.run.append(self.run.metrics, {"step": logged, **values})
        self.reporters.log(done, values)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl numbered as format 2 counts (step ``n``: after ``n`` updates; step 0:
    the zero-shot line), whichever format wrote it. Lines up to the first unreadable one."""
    run = RunDirectory(run_dir)
    records = list(read_jsonl(run.metrics))
    if metrics_format(run.header()) >= 2:
        return records
    return [{**record, "step": record["step"] + 1} for record in records]


def training_losses(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) of the lines that logged a training loss (not the zero-shot line)."""
    return [(record["step"], record["loss"]) for record in records if "loss" in record]


def last_loss(run_dir: str | Path) -> float | None:
    """The last logged training loss (every estimator logs it here, while gradient-based
    ones write no trajectory records)."""
    losses = training_losses(list(read_jsonl(RunDirectory(run_dir).metrics)))
    return losses[-1][1] if losses else None
