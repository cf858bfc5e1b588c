"""``zo bench compare``: every estimator through the same loop, budget, task and model.

A comparison config names a base experiment, overrides shared by every method (the step
budget, the trainable set) and per-estimator settings (lr, eps: each method's own scale).
Each method trains in a fresh process (``zo train``), so its peak memory is its own; the
result is one table (accuracy, loss, step time, peak memory) and one plot of the loss
curves, printed and optionally appended to --results with the command (the plot beside it,
in figures/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from zo.commands.common import EXPERIMENTS, record_arguments
from zo.config import ConfigError, read_yaml

EXAMPLE = "zo bench compare --only zo_sgd,zo_adam --out runs/compare"


def load_plan(path: str) -> tuple[str, list[str], dict[str, dict[str, Any]]]:
    data = read_yaml(path)
    unknown = sorted(set(data) - {"base", "overrides", "estimators"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]}; valid: base, overrides, estimators")
    if not isinstance(data.get("base"), str):
        raise ConfigError(f"{path}: `base` must name the experiment config every method shares")
    methods = data.get("estimators")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{path}: `estimators` must map estimator names to their settings")
    import estimators

    for label, settings in methods.items():
        try:
            estimators.get_estimator(estimator_of(label, settings))
        except estimators.UnknownEstimatorError as error:
            raise ConfigError(f"{path}: {error}") from None
    return data["base"], [str(o) for o in data.get("overrides") or []], methods


def estimator_of(label: str, settings: dict[str, Any] | None) -> str:
    """A method is named by its estimator, or labelled freely with ``estimator: NAME``
    among its settings (to compare one estimator on several trainable sets)."""
    return str((settings or {}).get("estimator", label))


def method_experiment(base: str, label: str, settings: dict[str, Any]) -> tuple[dict, list[str]]:
    """A method's experiment: the base config with its estimator section replaced by the
    method's own (the base's lr/eps belong to the base's estimator, not to this one), and
    the method's extra overrides."""
    settings = dict(settings or {})
    extra = [str(o) for o in settings.pop("overrides", [])]
    name = str(settings.pop("estimator", label))
    data = read_yaml(base)
    data["estimator"] = {"name": name, **settings}
    return data, extra


def method_configs(path: str):
    """Each method's fully resolved RunConfig (what `zo validate` checks)."""
    from zo.config import config_from_data

    base, overrides, methods = load_plan(path)
    configs = []
    for name, settings in methods.items():
        data, extra = method_experiment(base, name, settings)
        configs.append((name, config_from_data(data, [*overrides, *extra])))
    return configs


def run_method(
    base: str, overrides: list[str], name: str, settings: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Train one method in its own process; its summary plus its per-step losses."""
    import yaml

    data, extra = method_experiment(base, name, settings)
    config = out.parent / f"{name}.yaml"  # beside the run: `zo train` refuses a non-empty out
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    command = [sys.executable, "-m", "zo.cli", "train", "--config", str(config), *overrides]
    command += [*extra, f"train.out={out}", "train.progress=false"]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        return {"estimator": name, "error": finished.stderr.strip().splitlines()[-1:]}
    return finished_method(name, out)


def finished_method(name: str, out: Path) -> dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    return {"estimator": name, **summary, "losses": _losses(out)}


def _losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) as the progress bar counts, whichever metrics format the run wrote."""
    from zo.metrics_log import read_metrics, training_losses

    return training_losses(read_metrics(run))


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for result in results:
        if "losses" in result:
            steps, losses = zip(*result["losses"], strict=True) if result["losses"] else ((), ())
            axis.plot(steps, losses, label=result["estimator"])
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (logged steps)")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def table(results: list[dict[str, Any]]) -> str:
    metric = next((r["metric"] for r in results if "metric" in r), "score")
    rows = [
        f"| estimator | zero-shot {metric} | final {metric} | final loss | s/step | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['estimator']} | failed: {' '.join(r['error'])} | | | | |")
            continue
        zero_shot = r["zero_shot_score"]
        rows.append(
            f"| {r['estimator']} | {'-' if zero_shot is None else f'{zero_shot:.3f}'} "
            f"| {r['final_score']:.3f} "
            f"| {r['final_loss']:.4f} | {1 / r['steps_per_second']:.3f} "
            f"| {r['peak_memory_bytes'] / 2**20:.0f} MiB |"
        )
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=str(EXPERIMENTS / "smollm2" / "compare_estimators.yaml"),
        help="comparison plan: a base experiment, shared overrides, settings per estimator",
    )
    parser.add_argument("--only", default="", help="comma-separated subset of the estimators")
    parser.add_argument("--out", default="runs/compare", help="parent of the per-method runs")
    record_arguments(parser)
    parser.add_argument(
        "--continue",
        dest="continue_dir",
        metavar="DIR",
        help="finish an earlier comparison in DIR: methods with a finished run there are "
        "read back, not retrained",
    )


def run(args: argparse.Namespace) -> int:
    base, overrides, methods = load_plan(args.config)
    only = [n for n in args.only.split(",") if n]
    missing = sorted(set(only) - set(methods))
    if missing:
        raise ConfigError(f"--only: {missing} not in {args.config}; it has {sorted(methods)}")
    if args.continue_dir is not None:
        parent = Path(args.continue_dir)
        if not parent.is_dir():
            raise ConfigError(f"--continue {parent}: no such comparison directory")
        stamp = parent.name
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        parent = Path(args.out) / stamp
    results = []
    for name, settings in methods.items():
        if only and name not in only:
            continue
        if (parent / name / "summary.json").is_file():
            print(f"reading the finished {name} run", file=sys.stderr, flush=True)
            results.append(finished_method(name, parent / name))
            continue
        print(f"training {name} ...", file=sys.stderr, flush=True)
        results.append(run_method(base, overrides, name, settings, parent / name))
    figure = plot(results, parent / "loss_curves.png")
    text = table(results)
    print(json.dumps([{k: v for k, v in r.items() if k != "losses"} for r in results]))
    print(text)
    print(f"loss curves: {figure}")
    if args.record:
        import shutil

        figures = args.results.parent / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        figure = Path(shutil.copy(figure, figures / f"compare-{stamp}.png"))
        with open(args.results, "a") as handle:
            handle.write(
                f"\n### bench compare ({stamp} UTC)\n\n`zo {' '.join(args.argv)}`\n\n"
                f"{text}\n\nLoss curves: `{figure.relative_to(args.results.parent)}`\n"
            )
    return 0
