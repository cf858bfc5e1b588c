"""Minor page faults and CPU seconds of a forward and a ZO-SGD step, with the glibc setting
`zo train` uses or glibc's default (issue 16: the bucket buffer pool).

    OMP_NUM_THREADS=1 python experiments/step_faults.py fixed 3    # zo train's 1 MiB threshold
    OMP_NUM_THREADS=1 python experiments/step_faults.py default 3  # glibc's adaptive one

OPT-125m shape, 12 layers, fp32, batch 16 x 64, one torch thread; the forward and the step
alternate after a warm-up of each; medians of the repeats and every repeat, as one JSON line.
Faults and CPU seconds (getrusage) hardly move with other load on a shared machine; the wall
seconds do.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

from estimators import ZOSGD
from zo.commands.bench import build_opt, make_batch, scored_loss
from zo.memory import measure_call, return_large_frees_to_os


def main(malloc: str, repeats: int) -> dict:
    if malloc not in ("fixed", "default"):
        raise SystemExit(f"malloc must be fixed or default, got {malloc!r}")
    if malloc == "fixed" and not return_large_frees_to_os():
        raise SystemExit("could not fix glibc's mmap threshold (not glibc?)")
    torch.set_num_threads(1)
    model = build_opt(12, "cpu")
    ids = make_batch(16, 64, model.config.vocab_size, "cpu")
    optimizer = ZOSGD(model.parameters(), lr=1e-7, eps=1e-3, seed=0)

    def forward() -> None:
        with torch.no_grad():
            scored_loss(model, ids)

    runs = {"forward": forward, "step": lambda: optimizer.step(lambda: scored_loss(model, ids))}
    for fn in runs.values():  # warm-up: bucket plan, buffer pool, allocator
        fn()
    costs = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            costs[name].append(measure_call(fn))
    result: dict = {"malloc": malloc, "repeats": repeats}
    for name, values in costs.items():
        for field in ("seconds", "minor_faults", "user_seconds", "system_seconds"):
            result[f"{name}_{field}"] = statistics.median(getattr(c, field) for c in values)
        result[f"{name}_all"] = [
            [
                round(c.seconds, 3),
                c.minor_faults,
                round(c.user_seconds, 3),
                round(c.system_seconds, 3),
            ]
            for c in values
        ]
    cpu = {n: result[f"{n}_user_seconds"] + result[f"{n}_system_seconds"] for n in runs}
    result["step_cpu_over_two_forwards_cpu"] = cpu["step"] / (2 * cpu["forward"])
    pool = optimizer.engine.pool
    result["pool_allocations"] = pool.allocations
    result["pool_kept_bytes"] = pool.kept_bytes()
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)))
