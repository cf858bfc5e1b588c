"""What every verb shares: the exit codes, the usage error, the help layout, config arguments,
and where the repository's experiments live when ``zo`` runs from a checkout."""

from __future__ import annotations

import argparse
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

EXPERIMENTS = Path("experiments")
"""The repository's experiments folder, relative to where ``zo`` runs (a checkout's root):
an installed package carries no experiments, so every command takes the path as an argument
and this is only its default."""
RESULTS = EXPERIMENTS / "RESULTS.md"
"""Where ``--record`` appends a benchmark's table by default."""


class UsageError(Exception):
    """The user asked for something impossible (exit 2, one ``zo: error:`` line)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in ``--help`` (unless its help states it, or it is None or a
    flag's False); descriptions and epilogs (the example, the exit codes) keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" not in text
            and action.default not in (None, False, argparse.SUPPRESS)
            and (action.option_strings or action.nargs in (argparse.OPTIONAL, "*"))
        ):
            text += " (default: %(default)s)"
        return text.strip() or None


def verb_epilog(example: str) -> str:
    """A verb's (or a benchmark's) ``--help`` ending: one example command, the exit codes."""
    return f"example:\n  {example}\n\n{EXIT_CODES}"


def config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML experiment config")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, before or after --config, e.g. train.steps=50",
    )


def record_arguments(parser: argparse.ArgumentParser) -> None:
    """``--record`` appends a benchmark's table, with its command, to ``--results``."""
    parser.add_argument("--record", action="store_true", help="append the result to --results")
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        metavar="FILE",
        help="the results file --record appends to",
    )
