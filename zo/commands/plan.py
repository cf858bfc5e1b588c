"""Predict the peak memory of a training step, component by component, before any model loads
(nothing is downloaded or built); zo.plan holds the planner and its arguments."""

from __future__ import annotations

import argparse

EXAMPLE = (
    "zo plan --model llama-2-7b --estimator zo_sgd --trainable mask:0.001 --quant nf4 "
    "--batch 16 --seq 256"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from zo.plan import add_arguments as plan_arguments

    plan_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from zo.plan import run as plan_run

    return plan_run(args)
