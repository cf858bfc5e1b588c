"""Block-wise ZO with and without activation reuse: time per step, measured in one run.

Each step perturbs one block; with reuse the blocks before it run once per estimate
instead of once per forward. Printed: seconds per step (median over rounds of a full cycle
of blocks, so every block is weighted alike) for block_zo with reuse, without, ZO-SGD and
two plain forwards, their ratios, and the reuse ratio per block position (the saving
grows with depth). Variants alternate round by round, so drift on a shared machine hits
them alike. Also checked: the two block_zo variants give bit-identical scalars.

    .venv/bin/python experiments/bench_block_zo.py --model llama-16l
    .venv/bin/python experiments/bench_block_zo.py --model smollm2 --rounds 1 --no-zo-sgd
    .venv/bin/python experiments/bench_block_zo.py --model llama-16l --device cuda

The loss scores the last positions of each sequence (``zo.commands.bench.scored_loss``: logits only
where scored), fp32, random token batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch

import estimators
from zo.commands.bench import device_name, make_batch, record, scored_loss
from zo.commands.common import RESULTS
from zo.engine import EngineConfig, seeded
from zo.memory import time_call

LLAMA_SHAPES = {  # random-weight Llamas: many blocks, so reuse has something to skip
    "llama-16l": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "num_hidden_layers": 16,
        "vocab_size": 32000,
    },
    "llama-8l": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 8,
        "vocab_size": 8000,
    },
}


def build_model(name: str, device: str) -> torch.nn.Module:
    import transformers

    if name == "smollm2":
        from zo.models import bundled_model_dir

        model = transformers.LlamaForCausalLM.from_pretrained(
            bundled_model_dir(), dtype=torch.float32, use_safetensors=True
        )
    else:
        config = transformers.LlamaConfig(tie_word_embeddings=True, **LLAMA_SHAPES[name])
        with seeded(0):
            model = transformers.LlamaForCausalLM(config)
    return model.to(device).eval()


def trainable(model: torch.nn.Module, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    named = list(model.named_parameters())
    return named if which == "full" else [(n, p) for n, p in named if ".layers." in n]


def run(args: argparse.Namespace) -> dict:
    model = build_model(args.model, args.device)
    ids = make_batch(args.batch, args.seq, model.config.vocab_size, args.device)
    params = trainable(model, args.trainable)
    engine = EngineConfig(threads=args.threads)

    def block_zo(reuse: bool) -> torch.optim.Optimizer:
        return estimators.build_estimator(
            "block_zo", params, model=model, lr=1e-7, seed=0, engine=engine, reuse_activations=reuse
        )

    optimizers: dict[str, torch.optim.Optimizer] = {
        "block_zo_reuse": block_zo(True),
        "block_zo_no_reuse": block_zo(False),
    }
    if args.zo_sgd:
        optimizers["zo_sgd"] = estimators.build_estimator(
            "zo_sgd", params, lr=1e-7, seed=0, engine=engine
        )
    units = optimizers["block_zo_reuse"].units
    closure = lambda: scored_loss(model, ids)  # noqa: E731

    @torch.no_grad()
    def two_forwards() -> None:
        closure()
        closure()

    steps: dict[str, Callable[[], object]] = {
        name: (lambda o=o: o.step(closure)) for name, o in optimizers.items()
    }
    steps["two_forwards"] = two_forwards

    # warm-up: one step of each variant; the block_zo estimates (at the same weights)
    # must agree bit for bit
    reuse, plain = optimizers["block_zo_reuse"], optimizers["block_zo_no_reuse"]
    if reuse.estimate(closure).scalars != plain.estimate(closure).scalars:
        raise AssertionError("activation reuse changed the block_zo estimate")
    reuse.step()
    plain.step()
    if "zo_sgd" in optimizers:
        optimizers["zo_sgd"].step(closure)
    two_forwards()

    per_step: dict[str, list[float]] = {name: [] for name in steps}
    per_unit: dict[str, list[list[float]]] = {
        name: [[] for _ in units] for name in ("block_zo_reuse", "block_zo_no_reuse")
    }
    for _ in range(args.rounds):
        for name, step in steps.items():
            total = 0.0
            for _ in units:  # one full cycle: every block once
                block_opt = optimizers[name] if name in per_unit else None
                position = block_opt.unit_position(block_opt.step_count) if block_opt else 0
                seconds = time_call(step, args.device)
                total += seconds
                if name in per_unit:
                    per_unit[name][position].append(seconds)
            per_step[name].append(total / len(units))
    median = {name: statistics.median(times) for name, times in per_step.items()}
    by_block = {
        unit.name: statistics.median(per_unit["block_zo_reuse"][i])
        / statistics.median(per_unit["block_zo_no_reuse"][i])
        for i, unit in enumerate(units)
    }
    result = {
        "benchmark": "block_zo_reuse",
        "device": args.device,
        "model": args.model,
        "blocks": len(reuse.blocks),
        "units": len(units),
        "trainable": args.trainable,
        "batch": f"{args.batch}x{args.seq}",
        "rounds": args.rounds,
        "seconds_per_step": median,
        "reuse_over_no_reuse": median["block_zo_reuse"] / median["block_zo_no_reuse"],
        "no_reuse_over_reuse_speedup": median["block_zo_no_reuse"] / median["block_zo_reuse"],
        "reuse_over_two_forwards": median["block_zo_reuse"] / median["two_forwards"],
        "no_reuse_over_two_forwards": median["block_zo_no_reuse"] / median["two_forwards"],
        "reuse_over_no_reuse_by_unit": by_block,
    }
    if "zo_sgd" in median:
        result["zo_sgd_over_two_forwards"] = median["zo_sgd"] / median["two_forwards"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*LLAMA_SHAPES, "smollm2"], default="llama-16l")
    parser.add_argument("--trainable", choices=["full", "blocks"], default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0 = auto)")
    parser.add_argument(
        "--no-zo-sgd", dest="zo_sgd", action="store_false", help="skip the ZO-SGD reference"
    )
    parser.add_argument("--record", action="store_true", help="append to experiments/RESULTS.md")
    args = parser.parse_args(argv)
    result = run(args)
    print(f"# {device_name(args.device)}")
    print(json.dumps(result, indent=2))
    if args.record:
        command = "python experiments/bench_block_zo.py " + " ".join(argv or sys.argv[1:])
        record(result, command, RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
