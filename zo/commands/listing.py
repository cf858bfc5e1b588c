"""List the registered models, tasks and estimators (the names configs use)."""

from __future__ import annotations

import argparse

EXAMPLE = "zo list estimators"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kind",
        nargs="?",
        choices=["models", "tasks", "estimators"],
        help="list only these (default: all three)",
    )


def run(args: argparse.Namespace) -> int:
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
