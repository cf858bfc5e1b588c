"""Rebuild a run's trained tensors from its trajectory (seeds and scalars), and compare them
with the run's checkpoint (exit 1 when they differ)."""

from __future__ import annotations

import argparse

EXAMPLE = "zo replay runs/mine --out runs/mine-replayed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--out", required=True, help="where to write trainable.safetensors")
    parser.add_argument(
        "--no-compare",
        action="store_true",
        help="do not read the run's checkpoint (to compare with it): e.g. when it is damaged",
    )


def run(args: argparse.Namespace) -> int:
    from zo.replay import replay

    result = replay(args.run, args.out, compare=not args.no_compare)
    return 0 if result.get("bit_identical_to_checkpoint", True) else 1
