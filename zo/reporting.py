"""Where a run's numbers go besides its own files: ``train.report_to: [tensorboard, wandb, csv]``.

The run directory's ``metrics.jsonl`` is always written (:mod:`zo.run_directory`); these
reporters are optional and off by default. Each gets the same numbers at the same steps,
counted as the progress bar counts them: step 0 is the model before training (its zero-shot
dev score), step ``n`` the model after ``n`` updates. Only rank 0 of a data-parallel run
reports. A reporter whose package is missing is refused before any model loads, naming the
``pip install`` that adds it; none is ever skipped quietly.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from zo.config import ConfigError

REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "csv": None}
"""reporter name -> the package it needs (None: nothing beyond zo)."""
INSTALL = {"tensorboard": "pip install 'zo-llm[tensorboard]'", "wandb": "pip install wandb"}
CSV_FILE = "metrics.csv"
CSV_COLUMNS = ("step", "loss", "lr", "dev_score", "seconds", "peak_memory_bytes")


def check_reporters(names: Iterable[str]) -> None:
    """Every name is a reporter whose package is importable; else a ConfigError naming the fix."""
    for name in names:
        if name not in REPORTERS:
            raise ConfigError(
                f"train.report_to: unknown reporter {name!r}; choose from {sorted(REPORTERS)}"
            )
        package = REPORTERS[name]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"train.report_to: {name} needs the {package} package, which is not "
                f"installed: {INSTALL[name]} (or drop {name} from train.report_to)"
            )


class Reporter(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardReporter:
    """Scalars under ``RUN/tensorboard`` (``tensorboard --logdir RUN``)."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events it logged past its checkpoint
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """One Weights & Biases run per run directory (its name), with the resolved config."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project="zo", name=run_dir.name, dir=str(run_dir), config=config, resume="allow"
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class CsvReporter:
    """``RUN/metrics.csv``: one row per logged step, fixed columns (empty where not measured);
    a resumed run keeps the rows up to its checkpoint and continues the file."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.path = run_dir / CSV_FILE
        kept: list[dict[str, str]] = []
        if start_step and self.path.exists():
            with open(self.path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= start_step]
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    def log(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as handle:
            row = {"step": step, **{k: v for k, v in values.items() if k in CSV_COLUMNS}}
            csv.DictWriter(handle, CSV_COLUMNS).writerow(row)

    def close(self) -> None:
        pass


class Reporters:
    """The reporters a run asked for, as one: ``log`` goes to each (nothing when none)."""

    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    @classmethod
    def open(
        cls,
        names: Iterable[str],
        run_dir: Path,
        config: dict[str, Any],
        start_step: int,
        enabled: bool = True,
    ) -> Reporters:
        """``enabled``: False on the ranks other than 0 (they report nothing)."""
        names = list(names)
        check_reporters(names)
        if not enabled:
            return cls([])
        built: dict[str, Any] = {
            "tensorboard": lambda: TensorBoardReporter(run_dir, start_step),
            "wandb": lambda: WandbReporter(run_dir, config),
            "csv": lambda: CsvReporter(run_dir, start_step),
        }
        return cls([built[name]() for name in dict.fromkeys(names)])

    def log(self, step: int, values: dict[str, Any]) -> None:
        numbers = {
            key: float(value)
            for key, value in values.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for reporter in self.reporters:
            reporter.log(step, numbers)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
