"""Evaluate a run with its own config and checkpoint, or the model of a config, optionally
with a run's checkpoint loaded; prints one JSON line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zo.commands.common import UsageError

EXAMPLE = (
    "zo eval runs/mine --split test | zo eval runs/mine --task sst2 task.fixtures=true | "
    "zo eval --config CONFIG --checkpoint runs/mine/checkpoint"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="RUN|key.sub=value",
        help="a run directory (its config.yaml and checkpoint), then config overrides",
    )
    parser.add_argument("--config", help="YAML experiment config (instead of a run directory)")
    parser.add_argument("--checkpoint", help="RUN/checkpoint to load the trained tensors from")
    parser.add_argument(
        "--split", default="dev", choices=["train", "dev", "test"], help="split to evaluate"
    )
    parser.add_argument(
        "--task",
        help="evaluate on this task instead (task.name=NAME, the run's task options dropped)",
    )


def _run_and_overrides(inputs: list[str]) -> tuple[str | None, list[str]]:
    """``[RUN] [key=value ...]``: the one item that is a directory or has no ``=`` is RUN."""
    runs = [item for item in inputs if "=" not in item or Path(item).is_dir()]
    if len(runs) > 1:
        raise UsageError(f"give one run directory, not {runs}; overrides look like key.sub=value")
    return (runs[0] if runs else None), [item for item in inputs if item not in runs]


def run(args: argparse.Namespace) -> int:
    from zo.config import experiment_from_data, read_run_yaml, read_yaml
    from zo.run_checkpoint import (
        checkpoint_source,
        load_run_checkpoint,
        open_run,
        require_checkpoint,
    )
    from zo.train import build_setup, evaluate

    run_dir, overrides = _run_and_overrides(args.inputs)
    if run_dir is not None and args.config and not Path(run_dir).is_dir():
        raise UsageError(f"{run_dir!r} is neither a run directory nor an override (key.sub=value)")
    if run_dir is not None and args.config:
        raise UsageError("give a run directory or --config FILE, not both")
    if run_dir is None and not args.config:
        raise UsageError("give a run directory (zo eval RUN) or --config FILE")
    run = open_run(run_dir) if run_dir is not None else None
    data = read_run_yaml(run.config) if run is not None else read_yaml(args.config)
    if args.task:
        loop_keys = ("max_length", "train_limit", "eval_limit", "calibrate")
        task = data.get("task") if isinstance(data.get("task"), dict) else {}
        data["task"] = {key: task[key] for key in loop_keys if key in task} | {"name": args.task}
    config = experiment_from_data(data, overrides, run.config if run is not None else args.config)
    source, at_most = checkpoint_source(args.checkpoint) if args.checkpoint else (run, None)
    if source is not None:
        require_checkpoint(source)  # before a model loads
    setup = build_setup(config)
    if source is not None:
        load_run_checkpoint(
            source, config, setup.trainable, setup.model, setup.device, at_most=at_most
        )
    examples = setup.task.load(args.split)[: config.task.eval_limit]
    result = {"task": config.task.name, "split": args.split, **evaluate(setup, examples)}
    print(json.dumps(result))
    return 0
