"""Export a run: full and name-pattern runs as a Hugging Face model directory, LoRA runs as a
PEFT adapter (--merge: merged into the base), mask runs merged into the base checkpoint."""

from __future__ import annotations

import argparse

EXAMPLE = "zo export runs/mine --out runs/mine-export"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (written by zo train)")
    parser.add_argument("--out", required=True, help="directory to write (created at once)")
    parser.add_argument(
        "--merge", action="store_true", help="LoRA runs: merge the adapter into the base model"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    from zo.export import export_run

    export_run(args.run, args.out, merge=args.merge, overwrite=args.overwrite)
    return 0
