"""The ``zo`` command: one table from verb to module, and the one place errors become exit codes.

Each verb module has ``add_arguments(parser)``, ``run(args) -> int`` and ``EXAMPLE`` (one
command line); its docstring is its ``--help`` description. Only the verb that runs is
imported, so ``zo --help`` stays fast. Usage errors (bad config, unknown names, missing files,
a run directory in the way, owned by another live process, or damaged) print one
``zo: error: ...`` line naming the problem and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from zo.commands.common import (
    DIVERGED_EXIT,
    EXIT_CODES,
    USAGE_EXIT,
    HelpFormatter,
    UsageError,
    verb_epilog,
)

VERBS: dict[str, tuple[str, str]] = {
    "train": ("zo.commands.train", "train from a YAML config"),
    "eval": ("zo.commands.eval", "evaluate a run (zo eval RUN) or a config's model (--config)"),
    "export": ("zo.commands.export", "write a run as a HF model, a PEFT adapter or a merged model"),
    "replay": ("zo.commands.replay", "rebuild a run's trained tensors from its trajectory"),
    "validate": ("zo.commands.validate", "check configs (default: every one under experiments/)"),
    "list": ("zo.commands.listing", "registered models, tasks, estimators"),
    "bench": ("zo.commands.bench", "benchmarks: step | memory | compare | eval"),
    "mask": ("zo.commands.mask", "compute a sensitive-parameter mask from calibration text"),
    "plan": ("zo.commands.plan", "does it fit? predict peak memory, or list what fits a --budget"),
    "merge": ("zo.commands.merge", "merge trained mask values into a dense HF checkpoint"),
    "tune": ("zo.commands.tune", "search lr / eps / scale by successive halving -> best.yaml"),
}
"""verb -> (module, one-line help)."""

__all__ = ["DIVERGED_EXIT", "USAGE_EXIT", "VERBS", "UsageError", "main", "make_parser"]


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the user asked for something impossible' (exit 2)."""
    import tasks
    from zo import models
    from zo.calibration import CalibrationError
    from zo.config import ConfigError
    from zo.masks import MaskError
    from zo.merge import MergeError
    from zo.run_lock import RunLockedError
    from zo.sparse_delta import SparseDeltaError
    from zo.staging import OutputDirectoryError
    from zo.trajectory import NothingToResumeError, ReplayError, RunDamagedError, RunExistsError

    return (
        UsageError,
        ConfigError,
        MergeError,
        MaskError,
        CalibrationError,
        SparseDeltaError,
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


def version() -> str:
    from zo import __version__

    return __version__


def make_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; only ``verb``'s module is imported and given its arguments
    (``zo --help`` lists every verb by its one-line help)."""
    parser = argparse.ArgumentParser(
        prog="zo",
        description="Fine-tune LLMs with forward passes only.",
        epilog=f"`zo VERB --help` describes a verb.\n\n{EXIT_CODES}",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zo {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")
    for name, (module_name, help_text) in VERBS.items():
        if name != verb:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        command = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            epilog=verb_epilog(module.EXAMPLE),
            formatter_class=HelpFormatter,
        )
        module.add_arguments(command)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """``parse_args``, except that positional ``key=value`` items may come before and after
    the options (``zo train a=1 --config C b=2``, ``zo eval RUN --split test a=1``)."""
    verb = next((item for item in argv if not item.startswith("-")), None)
    parser = make_parser(verb if verb in VERBS else None)
    args, extras = parser.parse_known_args(argv)
    field = next((name for name in ("overrides", "inputs") if hasattr(args, name)), None)
    stray = [item for item in extras if item.startswith("-") or "=" not in item]
    if extras and (stray or field is None):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if extras:
        setattr(args, field, [*getattr(args, field), *extras])
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)
        return importlib.import_module(VERBS[args.command][0]).run(args)
    except _usage_errors() as error:
        print(f"zo: error: {error}", file=sys.stderr)
        return USAGE_EXIT
    except _diverged() as error:
        print(f"zo: error: {error}", file=sys.stderr)
        return DIVERGED_EXIT
