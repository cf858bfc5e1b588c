"""The ``zo`` command: train | eval | export | replay | validate | list | bench | mask | plan | merge.

Usage errors (bad config, unknown names, missing files, a run directory in the way, owned
by another live process, or damaged) print one ``zo: error: ...`` line naming the problem
and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

USAGE_EXIT = 2
DIVERGED_EXIT = 3  # zo.divergence.DIVERGED_EXIT, without importing torch for --help
EXIT_CODES = """exit codes:
  0  done
  1  an unexpected error (a traceback: please report it)
  2  a usage error: a bad config, key, file or run directory, named in the message;
     nothing was started or changed
  3  training diverged (a non-finite loss or weights; see train.on_nonfinite): the
     message names the step and what to change; no non-finite weights were saved"""
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


class UsageError(Exception):
    pass


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the user asked for something impossible' (exit 2)."""
    import tasks
    from zo import models
    from zo.config import ConfigError
    from zo.merge import MergeError
    from zo.run_lock import RunLockedError
    from zo.staging import OutputDirectoryError
    from zo.trajectory import NothingToResumeError, ReplayError, RunDamagedError, RunExistsError

    return (
        UsageError,
        ConfigError,
        MergeError,
        OutputDirectoryError,
        RunExistsError,
        RunLockedError,
        RunDamagedError,
        NothingToResumeError,
        ReplayError,
        models.ModelNotFoundError,
        tasks.TaskError,
    )


def _diverged() -> type[BaseException]:
    from zo.divergence import TrainingDivergedError

    return TrainingDivergedError


def _config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML experiment config")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. train.steps=50",
    )


def cmd_train(args: argparse.Namespace) -> int:
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
        f"\nexport:                 {export_command(summary['run_dir'], config.trainable.kind)}"
    )
    return 0


def eval_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="evaluate a run (zo eval RUN) or a config's model (--config, --checkpoint)",
        description="Evaluate a run with its own config and checkpoint, or the model of a "
        "config, optionally with a run's checkpoint loaded.",
        epilog="examples: zo eval runs/mine --split test | zo eval runs/mine --task sst2 "
        "task.fixtures=true | zo eval --config CONFIG --checkpoint runs/mine/checkpoint",
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="RUN|key.sub=value",
        help="a run directory (its config.yaml and checkpoint), then config overrides",
    )
    parser.add_argument("--config", help="YAML experiment config (instead of a run directory)")
    parser.add_argument("--checkpoint", help="RUN/checkpoint to load the trained tensors from")
    parser.add_argument("--split", default="dev", choices=["train", "dev", "test"])
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


def cmd_eval(args: argparse.Namespace) -> int:
    from zo.config import config_from_data, read_yaml
    from zo.run_checkpoint import (
        checkpoint_source,
        load_run_checkpoint,
        open_run,
        require_checkpoint,
    )
    from zo.train import build_setup, evaluate

    run_dir, overrides = _run_and_overrides(args.inputs)
    if run_dir is not None and args.config:
        raise UsageError("give a run directory or --config FILE, not both")
    if run_dir is None and not args.config:
        raise UsageError("give a run directory (zo eval RUN) or --config FILE")
    run = open_run(run_dir) if run_dir is not None else None
    data = read_yaml(run.config if run is not None else args.config)
    if args.task:
        loop_keys = ("max_length", "train_limit", "eval_limit", "calibrate")
        task = data.get("task") if isinstance(data.get("task"), dict) else {}
        data["task"] = {key: task[key] for key in loop_keys if key in task} | {"name": args.task}
    config = config_from_data(data, overrides)
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


def export_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="write a run as a Hugging Face model, a PEFT adapter, or a merged model",
        description="Export a run: full and name-pattern runs as a Hugging Face model "
        "directory, LoRA runs as a PEFT adapter (--merge: merged into the base), mask runs "
        "merged into the base checkpoint.",
        epilog="example: zo export runs/mine --out runs/mine-export",
    )
    parser.add_argument("run", help="run directory (written by zo train)")
    parser.add_argument("--out", required=True, help="directory to write (created at once)")
    parser.add_argument(
        "--merge", action="store_true", help="LoRA runs: merge the adapter into the base model"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def cmd_export(args: argparse.Namespace) -> int:
    from zo.export import export_run

    export_run(args.run, args.out, merge=args.merge, overwrite=args.overwrite)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from zo.replay import replay

    result = replay(args.run, args.out, compare=not args.no_compare)
    return 0 if result.get("bit_identical_to_checkpoint", True) else 1


def shipped_configs() -> list[Path]:
    return sorted(EXPERIMENTS.glob("**/*.yaml"))


def is_comparison(path: Path) -> bool:
    """A comparison plan (``zo bench compare``) has a ``base`` experiment, not sections."""
    from zo.config import read_yaml

    return "base" in read_yaml(path)


def cmd_validate(args: argparse.Namespace) -> int:
    from zo.config import ConfigError, load_experiment
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
                validate(load_experiment(path))
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
}


BENCHES = ["step", "memory", "ops", "generators", *BENCH_MODULES]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "export": cmd_export,
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
    _config_arguments(
        sub.add_parser(
            "train",
            help="train from a YAML config",
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    eval_parser(sub)
    export_parser(sub)
    replay = sub.add_parser("replay", help="rebuild a run's trained tensors from its trajectory")
    replay.add_argument("run", help="run directory")
    replay.add_argument("--out", required=True, help="where to write trainable.safetensors")
    replay.add_argument(
        "--no-compare",
        action="store_true",
        help="do not read the run's checkpoint (to compare with it): e.g. when it is damaged",
    )
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


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, except that a verb with ``inputs`` (``zo eval RUN --split test
    key=value``) also takes positional items after its options."""
    args, extras = parser.parse_known_args(argv)
    stray = [item for item in extras if item.startswith("-") or "=" not in item]
    if extras and (stray or not hasattr(args, "inputs")):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if extras:
        args.inputs = [*args.inputs, *extras]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in MODULE_COMMANDS:
            # Dispatched before parsing: argparse's REMAINDER cannot start with an option
            # (`zo plan --model x`), and the module's parser owns every argument anyway.
            module_name, _ = MODULE_COMMANDS[argv[0]]
            return run_module_command(module_name, f"zo {argv[0]}", argv[1:])
        args = parse(make_parser(), argv)
        return COMMANDS[args.command](args)
    except _usage_errors() as error:
        print(f"zo: error: {error}", file=sys.stderr)
        return USAGE_EXIT
    except _diverged() as error:
        print(f"zo: error: {error}", file=sys.stderr)
        return DIVERGED_EXIT


if __name__ == "__main__":
    sys.exit(main())
