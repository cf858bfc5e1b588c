"""The ``zo`` command: train | eval | replay | validate | list | bench | mask | plan | merge | tune.

Usage errors (bad config, unknown names, missing files, a run directory in the way)
print one ``zo: error: ...`` line naming the problem and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

USAGE_EXIT = 2
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


class UsageError(Exception):
    pass


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the user asked for something impossible' (exit 2)."""
    import tasks
    from zo import models
    from zo.config import ConfigError
    from zo.trajectory import NothingToResumeError, ReplayError, RunExistsError

    return (
        UsageError,
        ConfigError,
        RunExistsError,
        NothingToResumeError,
        ReplayError,
        models.ModelNotFoundError,
        tasks.TaskError,
    )


def _config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML experiment config")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. train.steps=50",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from zo.config import load_config
    from zo.distributed import DataParallel
    from zo.memory import format_bytes
    from zo.train import train

    config = load_config(args.config, args.overrides)
    summary = train(config)
    if not DataParallel.from_environment().is_main:
        return 0  # rank 0 reports for the data-parallel run
    metric, zero_shot = summary["metric"], summary["zero_shot_score"]
    label = f"dev {metric}:"
    print(f"zero-shot {label:<13} {zero_shot:.4f}" if zero_shot is not None else "", end="")
    print(
        f"\nfinal {label:<17} {summary['final_score']:.4f}"
        f"\npeak memory:            {format_bytes(summary['peak_memory_bytes'])} ({summary['device']}"
        f"{', per process' if summary['processes'] > 1 else ''})"
        f"\nprocesses:              {summary['processes']}"
        f"\nwall time:              {summary['wall_seconds']:.1f} s"
        f" ({summary['steps_per_second']:.2f} steps/s)"
        f"\nrun directory:          {summary['run_dir']}"
        f"\nloss plot:              {summary['loss_plot']}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from zo.config import load_config
    from zo.train import build_setup, evaluate
    from zo.trajectory import RunDirectory

    config = load_config(args.config, args.overrides)
    setup = build_setup(config)
    if args.checkpoint:
        folder = Path(args.checkpoint)
        run = RunDirectory(folder.parent if folder.name == "checkpoint" else folder)
        if not run.has_checkpoint():
            raise UsageError(f"--checkpoint {args.checkpoint}: no checkpoint there")
        setup.trainable.load_state_dict(run.load_checkpoint(setup.device).tensors)
    examples = setup.task.load(args.split)[: config.task.eval_limit]
    result = {"task": config.task.name, "split": args.split, **evaluate(setup, examples)}
    print(json.dumps(result))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from zo.train import replay

    result = replay(args.run, args.out)
    return 0 if result.get("bit_identical_to_checkpoint", True) else 1


def shipped_configs() -> list[Path]:
    return sorted(EXPERIMENTS.glob("**/*.yaml"))


def is_comparison(path: Path) -> bool:
    """A comparison plan (``zo bench compare``) has a ``base`` experiment, not sections."""
    from zo.config import read_yaml

    return "base" in read_yaml(path)


def cmd_validate(args: argparse.Namespace) -> int:
    from zo.config import ConfigError, load_config
    from zo.train import validate

    paths = [Path(p) for p in args.paths] or shipped_configs()
    if not paths:
        raise UsageError("no config files given and none shipped under experiments/")
    failures = 0
    for path in paths:
        try:
            if is_comparison(path):
                from zo.compare import method_configs

                for _, config in method_configs(str(path)):
                    validate(config)
            else:
                validate(load_config(path))
            print(f"ok    {path}")
        except ConfigError as error:
            failures += 1
            print(f"error {path}: {error}")
    return USAGE_EXIT if failures else 0


def cmd_list(args: argparse.Namespace) -> int:
    import estimators
    import tasks
    from zo import models

    listings = {
        "models": models.available_models,
        "tasks": tasks.available_tasks,
        "estimators": estimators.available_estimators,
    }
    for kind in [args.kind] if args.kind else listings:
        print(f"{kind}: {', '.join(listings[kind]())}")
    return 0


def run_module_command(module_name: str, prog: str, argv: list[str]) -> int:
    """A command whose module owns its arguments: ``add_arguments(parser)`` + ``run(args)``.

    The module is imported only when its command runs, so ``zo --help`` stays fast.
    """
    import importlib

    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog, description=module.__doc__.split("\n")[0])
    module.add_arguments(parser)
    options = parser.parse_args(argv)
    options.argv = argv
    return module.run(options)


# Benchmarks with their own argument parsers: bench name -> module.
BENCH_MODULES = {"compare": "zo.compare", "eval": "zo.bench_eval"}


def cmd_bench(args: argparse.Namespace) -> int:
    from zo import bench

    if args.what not in BENCH_MODULES:
        return bench.main(args.what, args.options)
    return run_module_command(BENCH_MODULES[args.what], f"zo bench {args.what}", args.options)


# Commands with their own argument parsers: command -> (module, one-line help).
MODULE_COMMANDS: dict[str, tuple[str, str]] = {
    "mask": ("zo.mask_cli", "compute a sensitive-parameter mask from calibration text"),
    "plan": ("zo.plan", "predict peak memory per component for a model, estimator and batch"),
    "merge": ("zo.merge", "merge trained mask values into a dense HF checkpoint"),
    "tune": ("zo.tune_cli", "search lr/eps by successive halving on dev loss; writes best.yaml"),
}


BENCHES = ["step", "memory", "ops", "generators", *BENCH_MODULES]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "replay": cmd_replay,
    "validate": cmd_validate,
    "list": cmd_list,
    "bench": cmd_bench,
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zo", description="Fine-tune LLMs with forward passes only."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _config_arguments(sub.add_parser("train", help="train from a YAML config"))
    evaluate = sub.add_parser("eval", help="evaluate a model (or a run's checkpoint)")
    _config_arguments(evaluate)
    evaluate.add_argument("--checkpoint", help="RUN/checkpoint to load the trained tensors from")
    evaluate.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    replay = sub.add_parser("replay", help="rebuild a run's trained tensors from its trajectory")
    replay.add_argument("run", help="run directory")
    replay.add_argument("--out", required=True, help="where to write trainable.safetensors")
    validate = sub.add_parser("validate", help="check configs (default: every shipped one)")
    validate.add_argument("paths", nargs="*")
    listing = sub.add_parser("list", help="registered models, tasks, estimators")
    listing.add_argument("kind", nargs="?", choices=["models", "tasks", "estimators"])
    bench = sub.add_parser("bench", help=f"benchmarks: {' | '.join(BENCHES)}")
    bench.add_argument("what", choices=BENCHES)
    bench.add_argument("options", nargs=argparse.REMAINDER)
    for name, (_, help_text) in MODULE_COMMANDS.items():
        # add_help=False: `zo NAME --help` reaches the module's own parser
        command = sub.add_parser(name, help=help_text, add_help=False)
        command.add_argument("options", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in MODULE_COMMANDS:
            # Dispatched before parsing: argparse's REMAINDER cannot start with an option
            # (`zo plan --model x`), and the module's parser owns every argument anyway.
            module_name, _ = MODULE_COMMANDS[argv[0]]
            return run_module_command(module_name, f"zo {argv[0]}", argv[1:])
        args = make_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except _usage_errors() as error:
        print(f"zo: error: {error}", file=sys.stderr)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())
