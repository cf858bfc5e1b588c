"""Plans and budget searches as text tables and JSON, with every assumption echoed."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from zo.memory.search import Fit, SearchResult
from zo.memory.step import GIB, Plan, PlanRequest


def assumptions(request: PlanRequest, sources: dict[str, str]) -> dict[str, Any]:
    """What a plan assumed, each with where it came from (``sources``: a setting -> "given",
    "config FILE", "zo train's default", ...; unnamed ones are the planner's own)."""
    values = {
        "model": request.model,
        "model_type": request.shape.model_type,
        "device": request.device,
        "dtype": request.dtype,
        "compute_dtype": request.activation_dtype,
        "quant": request.quant,
        "double_quant": request.double_quant,
        "trainable": request.trainable,
        "lora_r": request.lora_r,
        "estimator": request.estimator.name,
        "batch": request.batch,
        "seq_len": request.seq_len,
        "scored": request.scored,
        "logits": request.logits,
        "attention": request.attention,
        "gradient_checkpointing": request.gradient_checkpointing,
        "engine": asdict(request.engine),
    }
    derived = {
        "model_type": "the model's config",
        "compute_dtype": "--compute-dtype" if request.compute_dtype else "dtype, as zo train",
        "engine": "zo train's default (engine section)",
    }
    return {
        key: {"value": value, "from": sources.get(key) or derived.get(key, "planner default")}
        for key, value in values.items()
    }


def format_assumptions(echo: dict[str, Any]) -> str:
    width = max(len(key) for key in echo)
    lines = ["assumptions:"]
    for key, entry in echo.items():
        lines.append(f"  {key:<{width}}  {entry['value']}  ({entry['from']})")
    return "\n".join(lines)


def plan_table(plan: Plan) -> str:
    rows = [(c.name, c.bytes, c.note) for c in plan.components]
    rows += [
        (f"peak, allocator ({plan.peak_phase})", plan.peak_allocated, ""),
        (plan.overhead.name, plan.overhead.bytes, plan.overhead.note),
        ("process total", plan.process_total, ""),
    ]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'component':<{width}}  {'GiB':>8}  note"]
    lines += [f"{name:<{width}}  {count / GIB:>8.3f}  {note}" for name, count, note in rows]
    return "\n".join(lines)


def fit_row(fit: Fit) -> dict[str, Any]:
    request = fit.request
    return {
        "quant": request.quant,
        "trainable": request.trainable,
        "lora_r": request.lora_r if request.trainable.startswith("lora") else None,
        "estimator": request.estimator.name,
        "batch": request.batch,
        "seq_len": request.seq_len,
        "gradient_checkpointing": request.gradient_checkpointing,
        "attention": request.attention,
        "peak_allocated_bytes": fit.plan.peak_allocated,
        "process_total_bytes": fit.plan.process_total,
        "trainable_parameters": fit.plan.trainable_parameters,
        "relative_cost": round(fit.relative_cost, 3),
        "forward_passes_per_token": fit.cost,
    }


def search_table(result: SearchResult, budget: int, top: int | None) -> str:
    fits = result.fits if top is None else result.fits[:top]
    header = ("#", "quant", "trainable", "estimator", "batch", "seq", "ckpt", "peak GiB", "cost")
    rows = [
        (
            str(index),
            f.request.quant,
            f.request.trainable,
            f.request.estimator.name,
            str(f.request.batch),
            str(f.request.seq_len),
            "yes" if f.request.gradient_checkpointing else "no",
            f"{f.plan.process_total / GIB:.2f}",
            f"{f.relative_cost:.2f}",
        )
        for index, f in enumerate(fits, 1)
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"{len(result.fits)} configuration(s) fit in {budget / GIB:.2f} GiB "
        "(peak = process total: allocator peak + runtime or CUDA context), best first:"
    ]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    if top is not None and len(result.fits) > top:
        lines.append(f"... {len(result.fits) - top} more (--top 0 lists all, --json for scripts)")
    lines.append(
        "cost: forward-pass equivalents per training token relative to the cheapest row "
        "(compute per step, not steps to converge; zeroth-order methods need more steps)"
    )
    reasons: dict[str, list[str]] = {}
    for what, why in result.refused.items():
        reasons.setdefault(why, []).append(what)
    for why, combinations in reasons.items():
        lines.append(f"not planned ({len(combinations)}, e.g. {combinations[0]}): {why}")
    return "\n".join(lines)


def search_dict(result: SearchResult, budget: int, echo: dict[str, Any]) -> dict[str, Any]:
    return {
        "budget_bytes": budget,
        "assumptions": echo,
        "fits": [fit_row(f) for f in result.fits],
        "refused": result.refused,
    }
