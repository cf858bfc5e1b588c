"""``zo plan --gpus N --gpu-memory 80GiB``: one device, sharded over N, or offloaded?

The numbers are :mod:`zo.memory.parallel`'s (``plan_memory`` for one device, ``plan_sharded``
per rank of ``train.parallel=fsdp``, ``plan_offloaded`` for ``train.parallel=offload``), and
the verdict is its ``what_fits``. A mode that does not run the request (offload: an
estimator with per-element state or a trainable subset; either: a 4-bit base) prints its own
reason in its row, never left out silently; the other modes are still planned.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from typing import Any

from zo.memory.parallel import parallel_plans, what_fits
from zo.memory.search import parse_budget
from zo.memory.shapes import PlanError
from zo.memory.step import GIB, PlanRequest, plan_memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("beyond one device (train.parallel=fsdp | offload)")
    group.add_argument(
        "--gpus",
        type=int,
        help="devices to shard over (train.parallel=fsdp under torchrun); with --gpu-memory "
        "alone: 1",
    )
    group.add_argument(
        "--gpu-memory", help="memory of each device, e.g. 80GiB, 24G, 40GB (GiB = 2**30 bytes)"
    )


def wanted(options: argparse.Namespace) -> bool:
    return options.gpus is not None or options.gpu_memory is not None


@dataclass(frozen=True)
class ModeRow:
    """One way to run the request: its per-device peak, host memory and verdict."""

    mode: str
    devices: int
    device_peak_bytes: int | None
    host_bytes: int | None = None
    fits: bool | None = None
    """None: no --gpu-memory to compare with, or the mode cannot run this request."""
    refused: str | None = None
    """Why the mode is not planned for this request."""


def parallel_rows(
    request: PlanRequest, gpus: int, gpu_memory: int | None
) -> tuple[list[ModeRow], list[str]]:
    """The three modes' rows and the names of those that fit (empty without a memory)."""
    if gpus < 1:
        raise PlanError(f"--gpus must be 1 or more, got {gpus}")
    one = plan_memory(request)
    plans = parallel_plans(request, gpus)
    rows = [ModeRow("single", 1, one.process_total)]
    for mode, devices in (("fsdp", gpus), ("offload", 1)):
        plan = plans[mode]
        if isinstance(plan, PlanError):
            rows.append(ModeRow(mode, devices, None, refused=str(plan)))
        else:
            rows.append(
                ModeRow(mode, devices, plan.device_peak, host_bytes=plan.host_bytes or None)
            )
    if gpu_memory is None:
        return rows, []
    verdicts = list(what_fits(request, gpus, gpu_memory).values())  # single, fsdp xN, offload
    rows = [replace(row, fits=ok) for row, ok in zip(rows, verdicts, strict=True)]
    return rows, [row.mode for row in rows if row.fits]


def memory_of(options: argparse.Namespace) -> int | None:
    if options.gpu_memory is None:
        return None
    try:
        return parse_budget(options.gpu_memory)
    except PlanError:
        raise PlanError(
            f"--gpu-memory {options.gpu_memory!r} is not a size above zero: give a number "
            "with a unit, e.g. 80GiB, 24G, 40GB (GiB = 2**30 bytes, GB = 10**9)"
        ) from None


def report(request: PlanRequest, options: argparse.Namespace) -> dict[str, Any]:
    """What ``--json`` prints (the table shows the same)."""
    if options.budget is not None:
        raise PlanError(
            "--budget searches the settings that fit one device; --gpus/--gpu-memory compare "
            "one device, sharded and offloaded for the settings given: use one or the other"
        )
    gpus = 1 if options.gpus is None else options.gpus
    memory = memory_of(options)
    rows, fitting = parallel_rows(request, gpus, memory)
    return {
        "gpus": gpus,
        "gpu_memory_bytes": memory,
        "modes": [asdict(row) for row in rows],
        "fits": fitting,
    }


LABELS = {
    "single": "one device",
    "fsdp": "sharded (train.parallel=fsdp)",
    "offload": "offloaded (train.parallel=offload)",
}


def table(result: dict[str, Any]) -> str:
    memory = result["gpu_memory_bytes"]
    head = f"fits {memory / GIB:.2f} GiB" if memory is not None else "fits (give --gpu-memory)"
    lines = [f"{'mode':<36} {'devices':>7} {'peak per device':>16} {'host':>11}  {head}"]
    for row in result["modes"]:
        label = LABELS[row["mode"]]
        if row["refused"]:
            lines.append(f"{label:<36} {row['devices']:>7}  not planned: {row['refused']}")
            continue
        host = f"{row['host_bytes'] / GIB:.2f} GiB" if row["host_bytes"] is not None else "-"
        fits = {True: "yes", False: "no", None: "-"}[row["fits"]]
        peak = f"{row['device_peak_bytes'] / GIB:.2f} GiB"
        lines.append(f"{label:<36} {row['devices']:>7} {peak:>16} {host:>11}  {fits}")
    if memory is not None:
        fitting = ", ".join(LABELS[mode] for mode in result["fits"]) or "none of them"
        lines.append(f"fits in {memory / GIB:.2f} GiB per device: {fitting}")
    return "\n".join(lines)
