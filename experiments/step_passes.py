"""Where a ZO-SGD step's time goes beyond its two forwards: timers around the engine's passes.

    OMP_NUM_THREADS=1 python experiments/step_passes.py philox-ieee [threads]

Prints the step, a plain forward, their ratio, and the seconds per step spent in the bucket
copies of the perturbed forwards (``materialize``), the embedding's output-side perturbation
(``output_side``), the head's perturbed matmul block by block (``perturbed_linear``: its own
matmul included) and the update, on the OPT-125m shape, fp32, 16x64.
"""

from __future__ import annotations

import collections
import sys
import time

import torch

from estimators import ZOSGD
from zo import buckets
from zo.commands.bench import build_opt, make_batch, scored_loss
from zo.engine import EngineConfig, PerturbationEngine

SPENT: collections.Counter[str] = collections.Counter()


def timed(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def main(generator: str, threads: int, repeats: int = 3) -> None:
    torch.set_num_threads(threads)
    timed(PerturbationEngine, "materialize", "materialize")
    timed(buckets, "added_to_output", "output_side")
    timed(buckets, "perturbed_linear", "perturbed_linear")
    timed(PerturbationEngine, "update_device", "update")
    model = build_opt(12, "cpu", "125m", dtype=torch.float32)
    ids = make_batch(16, 64, model.config.vocab_size, "cpu")
    engine = EngineConfig(generator=generator)
    optimizer = ZOSGD(model.parameters(), lr=1e-7, eps=1e-3, seed=0, engine=engine)

    def closure():
        return scored_loss(model, ids)

    optimizer.step(closure)  # warm-up: bucket plan, kernel build, thread pool
    SPENT.clear()
    start = time.perf_counter()
    for _ in range(repeats):
        optimizer.step(closure)
    step = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        with torch.no_grad():
            closure()
    forward = (time.perf_counter() - start) / repeats
    passes = {label: round(seconds / repeats, 3) for label, seconds in SPENT.items()}
    print(
        f"{generator}, {threads} thread(s): step {step:.3f} s, forward {forward:.3f} s, "
        f"step / two forwards {step / (2 * forward):.3f}, passes per step {passes}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "auto", int(sys.argv[2]) if len(sys.argv) > 2 else 1)
