"""Tune lr and eps (and estimator.scale) by successive halving on dev loss (``zo tune``).

Example: ``zo tune --config experiments/tiny/smoke.yaml --out tunes/smoke --candidates 8
--rungs 3 --steps 10 --lr 1e-4:1e-2``. Each candidate trains in OUT/cand-XX; the table is
printed and written to OUT/candidates.csv, the plot to OUT/candidates.png, the state to
OUT/tune.json, and the winner to OUT/best.yaml (``zo train --config OUT/best.yaml``).
Running it again on the same OUT resumes (never retrains what is recorded).

Exit codes: 0 a winner was written; 2 a usage error (bad config or option, OUT holding a
tune with other settings); 3 no candidate moved the dev loss beyond noise (no best.yaml).
"""

from __future__ import annotations

import argparse

FLAT_EXIT = 3


EXAMPLE = "zo tune --config experiments/tiny/smoke.yaml --out runs/tune --lr 1e-4:1e-2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML experiment config to tune")
    parser.add_argument("--out", required=True, help="tune directory (created, or resumed)")
    parser.add_argument("--candidates", type=int, default=8, help="candidates drawn (default 8)")
    parser.add_argument("--rungs", type=int, default=3, help="halving rungs (default 3)")
    parser.add_argument(
        "--steps", type=int, default=20, help="steps of rung 0; rung r trains to steps*eta**r"
    )
    parser.add_argument("--eta", type=int, default=2, help="keep 1/eta per rung (default 2)")
    parser.add_argument(
        "--lr",
        help="lr list (1e-4,1e-3) or log-uniform range (1e-5:1e-2); default: the config's "
        "lr / 10 : lr * 10",
    )
    parser.add_argument("--eps", help="eps list or range as --lr; default: the config's eps")
    parser.add_argument(
        "--scale",
        help="estimator.scale values to try, e.g. absolute,relative; default: the config's",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the candidates' draw")
    parser.add_argument(
        "--min-improvement",
        type=float,
        default=1e-3,
        help="smallest dev-loss improvement that counts, relative to the zero-shot dev loss "
        "(default 0.001; twice the paired standard error over dev batches counts too)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. task.eval_limit=64",
    )


def options_from(args: argparse.Namespace):
    from zo.config import ConfigError
    from zo.tune import Axis, TuneOptions, parse_axis

    scale: tuple[str, ...] = ()
    if args.scale:
        scale = tuple(s.strip() for s in args.scale.split(",") if s.strip())
        if not scale:
            raise ConfigError("--scale: give one or more of absolute,relative")
    return TuneOptions(
        candidates=args.candidates,
        rungs=args.rungs,
        steps=args.steps,
        eta=args.eta,
        lr=parse_axis(args.lr, "lr") if args.lr else Axis(),
        eps=parse_axis(args.eps, "eps") if args.eps else Axis(),
        scale=scale,
        seed=args.seed,
        min_improvement=args.min_improvement,
    )


def run(args: argparse.Namespace) -> int:
    from zo.config import load_config
    from zo.tune import FLAT_MESSAGE, tune

    options = options_from(args)
    config = load_config(args.config, args.overrides)
    result = tune(config, args.out, options)
    print(result.table)
    print(f"table: {args.out}/candidates.csv  plot: {args.out}/candidates.png")
    if result.flat:
        print(FLAT_MESSAGE)
        return FLAT_EXIT
    print(f"winner {result.winner}: {result.best_yaml} (zo train --config {result.best_yaml})")
    return 0
