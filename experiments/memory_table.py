"""The README's memory table, from ``zo plan``'s planner, with measured peaks where this
machine can measure them.

    .venv/bin/python experiments/memory_table.py [--measure] [--models smollm2-135m,...]

Predictions: one training step on CUDA (bf16 weights and compute, batch 16 x 256 tokens, one
scored position per sequence, SDPA attention; forward_grad eager, as its registration asks),
allocator peak in GiB (``torch.cuda.max_memory_allocated``; the CUDA context's ~0.5 GiB
is outside it). With ``--measure``, each method also runs on this machine's CPU through
``experiments/plan_check.py --model`` (the bundled SmolLM2-135M in fp32, batch 4 x 128,
eager attention, a fresh process per method; random NF4 weights of its config for the 4-bit
rows) and the table shows predicted / measured live-tensor peaks for that setting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import estimators
from zo.memory.shapes import resolve_shape
from zo.memory.step import GIB, MIB, PlanRequest, plan_memory

MODELS = ("smollm2-135m", "llama-2-7b", "opt-13b")
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Method:
    label: str
    estimator: str
    trainable: str = "full"
    quant: str = "none"
    checkpointing: bool = False


METHODS = (
    Method("full fine-tuning (AdamW)", "adamw"),
    Method("+ activation checkpointing", "adamw", checkpointing=True),
    Method("LoRA r=8 q,v (AdamW)", "adamw", "lora"),
    Method("QLoRA: NF4 + LoRA r=8 (AdamW)", "adamw", "lora", "nf4"),
    Method("LOMO", "lomo"),
    *(
        Method(f"{name}", name)
        for name in estimators.available_estimators()
        if estimators.get_estimator(name).traits.zeroth_order
    ),
    Method("NF4 + 0.1% mask (zo_sgd)", "zo_sgd", "mask:0.001", "nf4"),
)
"""hybrid is left out: its memory depends on the first-order part it is given."""


def predicted(model: str, method: Method, **settings) -> int:
    spec = estimators.get_estimator(method.estimator)
    request = PlanRequest(
        shape=resolve_shape(model),
        estimator=spec.planned(),
        trainable=method.trainable,
        quant=method.quant,
        gradient_checkpointing=method.checkpointing,
        attention="eager" if spec.traits.eager_attention else settings.pop("attention", "sdpa"),
        **settings,
    )
    return plan_memory(request).peak_allocated


def measured(model: str, method: Method) -> dict:
    """plan_check's row for ``method`` on ``model`` (CPU, fp32, batch 4 x 128, eager)."""
    trainable = "lora:8" if method.trainable == "lora" else method.trainable
    command = [
        sys.executable,
        str(HERE / "plan_check.py"),
        "--model",
        model,
        "--estimators",
        method.estimator,
        "--trainable",
        trainable,
        "--quant",
        method.quant,
        "--json",
        *(["--checkpointing"] if method.checkpointing else []),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return rows[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--measure", action="store_true", help="measure the first model on CPU")
    options = parser.parse_args(argv)
    models = options.models.split(",")
    cuda = dict(device="cuda", dtype="bf16", batch=16, seq_len=256)
    print("Predicted allocator peak (GiB), CUDA, bf16, batch 16 x 256 tokens, scored loss:\n")
    print("| method | " + " | ".join(models) + " |")
    print("|---" * (len(models) + 1) + "|")
    for method in METHODS:
        cells = [f"{predicted(m, method, **cuda) / GIB:.2f}" for m in models]
        print(f"| {method.label} | " + " | ".join(cells) + " |")
    if not options.measure:
        return 0
    model = models[0]
    print(f"\n{model} on this CPU (fp32, batch 4 x 128, eager): predicted / measured MiB\n")
    print("| method | predicted | measured | ratio |")
    print("|---|---|---|---|")
    worst = 0.0
    for method in METHODS:
        row = measured(model, method)
        ratio = row["total_ratio"]
        worst = max(worst, abs(ratio - 1))
        print(
            f"| {method.label} | {row['predicted_total'] / MIB:.0f} | "
            f"{row['measured_total'] / MIB:.0f} | {ratio:.3f} |",
            flush=True,
        )
    print(f"\nworst |predicted / measured - 1| = {worst:.3f}")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
