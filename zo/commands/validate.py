"""Check experiment configs without training: every key, name and value, as zo train would.

A directory stands for every .yaml under it; without paths, the experiments/ folder of the
checkout zo runs from. Comparison plans (zo bench compare) are checked method by method."""

from __future__ import annotations

import argparse
from pathlib import Path

from zo.commands.common import EXPERIMENTS, USAGE_EXIT, UsageError

EXAMPLE = "zo validate experiments/smollm2 my-config.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="*",
        default=[str(EXPERIMENTS)],
        metavar="PATH",
        help="config files, or directories of them",
    )


def shipped_configs(folder: str | Path = EXPERIMENTS) -> list[Path]:
    """Every .yaml under ``folder`` (a checkout's experiments/ by default)."""
    return sorted(Path(folder).glob("**/*.yaml"))


def is_comparison(path: Path) -> bool:
    """A comparison plan (``zo bench compare``) has a ``base`` experiment, not sections."""
    from zo.config import read_yaml

    return "base" in read_yaml(path)


def config_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = shipped_configs(path)
            if not found:
                raise UsageError(f"{path}: a directory without .yaml configs")
            files += found
        elif path.exists() or path != EXPERIMENTS:
            files.append(path)
        else:
            raise UsageError(
                f"no config files given and no {EXPERIMENTS}/ folder here: run from a "
                "checkout of zo, or name the configs"
            )
    return files


def run(args: argparse.Namespace) -> int:
    from zo.commands.compare import method_configs
    from zo.config import ConfigError, load_experiment
    from zo.train import validate

    failures = 0
    for path in config_files(args.paths):
        try:
            if is_comparison(path):
                for _, config in method_configs(str(path)):
                    validate(config)
            else:
                validate(load_experiment(path))
            print(f"ok    {path}")
        except ConfigError as error:
            failures += 1
            print(f"error {path}: {error}")
    return USAGE_EXIT if failures else 0
