"""Train from a YAML experiment config, with key.sub=value overrides.

The run directory (train.out) holds the config, the trajectory, metrics.jsonl, checkpoints
and the summary; an interrupted run resumes from it (train.resume)."""

from __future__ import annotations

import argparse

from zo.commands.common import config_arguments

EXAMPLE = "zo train --config experiments/tiny/smoke.yaml train.steps=50 train.out=runs/mine"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from zo.config import load_experiment
    from zo.distributed import DataParallel
    from zo.export import export_command
    from zo.memory import format_bytes
    from zo.train import train

    config = load_experiment(args.config, args.overrides)
    summary = train(config)
    if not DataParallel.from_environment().is_main:
        return 0  # rank 0 reports for the data-parallel run
    metric, zero_shot = summary["metric"], summary["zero_shot_score"]
    rate = summary["steps_per_second"]
    speed = "no steps run" if rate is None else f"{rate:.2f} steps/s"
    label = f"dev {metric}:"
    print(f"zero-shot {label:<13} {zero_shot:.4f}" if zero_shot is not None else "", end="")
    print(
        f"\nfinal {label:<17} {summary['final_score']:.4f}"
        f"\npeak memory:            {format_bytes(summary['peak_memory_bytes'])} ({summary['device']}"
        f"{', per process' if summary['processes'] > 1 else ''})"
        f"\nprocesses:              {summary['processes']}"
        f"\nwall time:              {summary['wall_seconds']:.1f} s ({speed})"
        f"\nrun directory:          {summary['run_dir']}"
        f"\nloss plot:              {summary['loss_plot']}"
        f"\nexport:                 {export_command(summary['run_dir'], config.trainable.kind)}"
    )
    return 0
