"""Reliability table: seeded bad input and kill -9 against the zo command, tallied.

    python experiments/reliability.py --seeds 1 2 3 4 --cases 120 --kills 10

Bad input (zo.fuzz): generated bad configs and damaged copies of a tiny reference run,
through zo train, train resume=true, zo replay, zo eval RUN and zo eval --checkpoint. A case
passes when the command exits with its documented code (2 for a usage error, naming the file
or key), no exception escapes, and no byte of the run it refused or read changed.

Kills: a tiny run killed with SIGKILL at seeded points (some inside a step or a checkpoint
write), resumed each time with resume=true, must end bit-identical to an uninterrupted run
(every trained tensor, every trajectory record) and replay bit-identically.

Prints a Markdown table (for experiments/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from zo import fuzz

KILL_STEPS = 24
KILL_SETTINGS = [f"train.steps={KILL_STEPS}", "train.save_every=3", "train.log_every=3"]


def fuzz_table(seeds: list[int], count: int, work: Path) -> tuple[list[str], list[str]]:
    """The table's rows per kind of damage, and the failures (name: problems)."""
    config, reference = fuzz.write_reference(work / "reference")
    tally: dict[str, Counter] = {}
    failures = []
    for seed in seeds:
        for case in fuzz.cases(seed, work / f"seed-{seed}", config, reference, count):
            group = "config" if case.name.split(": ")[1] in fuzz.CONFIG_DAMAGE else "run"
            kind = f"{group}: {case.name.split(': ')[1]}"
            outcome = fuzz.check(case)
            row = tally.setdefault(kind, Counter())
            row["cases"] += 1
            if outcome.problems:
                row["failed"] += 1
                failures.append(f"seed {seed}: {case.name}: {' | '.join(outcome.problems)}")
            elif outcome.code == 2:
                row["refused"] += 1
            else:
                row["read"] += 1
    rows = []
    total: Counter = Counter()
    for kind in sorted(tally):
        row = tally[kind]
        total.update(row)
        rows.append(_row(kind, row))
    rows.append(_row("**all**", total))
    return rows, failures


def _row(kind: str, row: Counter) -> str:
    clean = row["refused"] + row["read"]
    return (
        f"| {kind} | {row['cases']} | {row['refused']} | {row['read']} | "
        f"{clean}/{row['cases']} | {row['failed']} |"
    )


def _records(run: Path) -> int:
    path = run / "trajectory.jsonl"
    return path.read_bytes().count(b'"type": "step"') if path.exists() else 0


def kill_survival(kills: int, seed: int, work: Path) -> tuple[int, int, bool, bool]:
    """(kills that hit a live run, launches, resumed == uninterrupted, replay bit-identical)."""
    config = fuzz.write_reference_config(work / "kill-config")
    whole, killed = work / "whole", work / "killed"
    settings = [*KILL_SETTINGS, f"train.out={whole}"]
    code, _, err = fuzz.call_zo(["train", "--config", str(config), *settings])
    assert code == 0, err
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, KILL_STEPS), kills))
    command = [sys.executable, "-m", "zo.cli", "train", "--config", str(config)]
    command += [*KILL_SETTINGS, f"train.out={killed}"]
    hit = launches = 0
    for position, point in enumerate(points):
        process = subprocess.Popen(
            [*command, *(["resume=true"] if position else [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        launches += 1
        while _records(killed) < point and process.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))  # inside a step or a checkpoint write
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            hit += 1
        process.wait()
    code, _, err = fuzz.call_zo([*command[3:], "resume=true"])
    assert code == 0, err
    launches += 1
    a = load_file(str(whole / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(killed / "checkpoint" / "trainable.safetensors"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same = same and _steps(whole) == _steps(killed)
    code, out, _ = fuzz.call_zo(["replay", str(killed), "--out", str(work / "replayed")])
    replayed = code == 0 and json.loads(out.strip().splitlines()[-1])["bit_identical_to_checkpoint"]
    return hit, launches, same, replayed


def _steps(run: Path) -> list[dict]:
    lines = (run / "trajectory.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"type": "step"' in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[13])
    parser.add_argument("--cases", type=int, default=64, help="fuzz cases per seed")
    parser.add_argument("--kills", type=int, default=0, help="kill -9 points (0: none)")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="zo-reliability-") as folder:
        work = Path(folder)
        rows, failures = fuzz_table(args.seeds, args.cases, work)
        print(f"bad input: seeds {args.seeds}, {args.cases} cases each\n")
        print(
            "| damage | cases | refused (exit 2, named) | read (exit 0, unchanged) | clean | failed |"
        )
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))
        for failure in failures:
            print(f"FAILED {failure}")
        if args.kills:
            hit, launches, same, replayed = kill_survival(args.kills, args.seeds[0], work)
            print(
                f"\nkill -9: {hit} kills hit a live run ({args.kills} points, {launches} "
                f"launches), resumed run bit-identical to the uninterrupted one: {same}, "
                f"replay bit-identical: {replayed}"
            )
    print(
        f"\n{platform.node()}: {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}; {time.time() - started:.0f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
