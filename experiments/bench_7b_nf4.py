"""Llama-2-7B shape, NF4 base, 0.1% sparse fp32 delta: ZO-SGD step peak vs forward peak.

Each measurement runs in a fresh process (this script re-invoked with ``--measure``):
build the random NF4 model layer by layer (:func:`zo.quant.build_random_quantized`), add
sparse deltas at a random 0.1% of every decoder linear weight (a sensitivity mask needs
gradients of the real model; a random mask of the same density costs the same memory), then

* ``forward``: one forward of the batch (the loss closure, under ``no_grad``);
* ``zo_step``: one ZO-SGD step (two perturbed forwards and the update) on the same batch.

The loss is the project's (``--loss scored``, as :mod:`tasks.losses`): hidden states at the
last position of each sequence, the head there only; ``--loss full`` is a language-model loss
over every position (a sequence x vocabulary logits tensor). On CUDA the script also prints
``zo plan``'s prediction for the same configuration next to the measured peak.

Peaks are taken after the build (CPU: VmHWM reset through ``/proc/self/clear_refs``; CUDA:
``max_memory_allocated`` after ``reset_peak_memory_stats``), so the ratio compares the
training step with inference, not with the build; the build's own peak is printed too.

    .venv/bin/python experiments/bench_7b_nf4.py                  # CPU, several minutes
    .venv/bin/python experiments/bench_7b_nf4.py --layers 2       # quick check of the plumbing
    python3 experiments/bench_7b_nf4.py --device cuda --cap-gib 8 --batch 16 --seq 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from zo.memory import (
    current_rss_bytes,
    format_bytes,
    peak_memory_bytes,
    peak_rss_bytes,
    reset_peak_memory,
    return_large_frees_to_os,
)

MEASUREMENTS = ("forward", "zo_step")
TARGET_RATIO = 1.05


def llama2_7b_config(layers: int):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def compute_dtype_name(args: argparse.Namespace) -> str:
    """fp32 on CPU (bitsandbytes' exact path there), bf16 on CUDA, unless given."""
    return args.compute_dtype or ("float32" if args.device == "cpu" else "bfloat16")


def predicted_peak_bytes(args: argparse.Namespace) -> int:
    """``zo plan``'s allocator peak for this configuration."""
    import estimators
    from zo.engine import EngineConfig
    from zo.memory.shapes import resolve_shape
    from zo.memory.step import PlanRequest, plan_memory

    shape = replace(resolve_shape("llama-2-7b"), layers=args.layers)
    request = PlanRequest(
        shape=shape,
        estimator=estimators.get_estimator("zo_sgd").planned(),
        trainable=f"mask:{args.density}",
        quant="nf4",
        compute_dtype=compute_dtype_name(args),
        dtype={"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.float_dtype],
        batch=args.batch,
        seq_len=args.seq,
        logits=args.loss,
        attention=args.attention,
        device=torch.device(args.device).type,
        engine=EngineConfig(threads=1),
    )
    return plan_memory(request).peak_allocated


def loss_closure(model, ids: torch.Tensor, loss: str):
    """The measured loss: ``scored`` (last position's logits, the project's) or ``full``."""
    if loss == "full":

        def full() -> torch.Tensor:
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
            flat = logits.reshape(-1, logits.shape[-1]).float()
            return F.cross_entropy(flat, ids[:, 1:].reshape(-1))

        return full
    from tasks.lm import backbone_and_head

    backbone, head = backbone_and_head(model)

    def scored() -> torch.Tensor:
        hidden = backbone(input_ids=ids[:, :-1], use_cache=False)[0]
        log_probs = head(hidden[:, -1]).float().log_softmax(dim=-1)
        return -log_probs.gather(1, ids[:, -1:]).mean()

    return scored


def measure(args: argparse.Namespace) -> dict:
    import estimators
    from zo.masks import compute_mask
    from zo.quant import build_random_quantized
    from zo.sparse_delta import apply_sparse_deltas

    device = torch.device(args.device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), device)
    elif not args.default_malloc:
        return_large_frees_to_os()
    compute = getattr(torch, compute_dtype_name(args))
    started = time.perf_counter()
    model = build_random_quantized(
        llama2_7b_config(args.layers),
        compute_dtype=compute,
        float_dtype=getattr(torch, args.float_dtype),
        seed=0,
        device=device,
        attn=args.attention,
    )
    # a sensitivity mask needs the real model's gradients; a random one costs the same
    mask = compute_mask(model, selection="random", density=args.density, seed=1)
    named = apply_sparse_deltas(model, mask)
    build_seconds = time.perf_counter() - started
    build_peak = peak_rss_bytes() if device.type == "cpu" else torch.cuda.max_memory_allocated()
    ids = torch.randint(
        32000, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(2)
    ).to(device)

    closure = loss_closure(model, ids, args.loss)
    optimizer = None
    if args.measure == "zo_step":
        optimizer = estimators.build_estimator("zo_sgd", named, lr=1e-6, eps=1e-3)
    baseline = current_rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated()
    reset_peak_memory(device)
    started = time.perf_counter()
    with torch.no_grad():
        loss = closure() if optimizer is None else optimizer.step(closure)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    return {
        "measure": args.measure,
        "peak_bytes": peak_memory_bytes(device),
        "reserved_peak_bytes": reserved,
        "resident_before_bytes": baseline,
        "build_peak_bytes": build_peak,
        "build_seconds": build_seconds,
        "seconds": seconds,
        "loss": float(loss),
        "trainable": sum(p.numel() for _, p in named),
    }


def run_fresh(args: argparse.Namespace, which: str) -> dict:
    command = [sys.executable, __file__, "--measure", which, *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"measurement {which} failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (7B: 32)")
    parser.add_argument("--density", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cap-gib", type=float, default=8.0, help="CUDA memory cap")
    parser.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="4-bit layers' compute dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--float-dtype",
        choices=("float32", "bfloat16", "float16"),
        default="bfloat16",
        help="embeddings and head",
    )
    parser.add_argument("--loss", choices=("scored", "full"), default="scored")
    parser.add_argument("--attention", choices=("eager", "sdpa"), default="eager")
    parser.add_argument("--default-malloc", action="store_true")
    parser.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device; use --device cpu")
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    results = {which: run_fresh(args, which) for which in MEASUREMENTS}
    forward, step = results["forward"], results["zo_step"]
    ratio = step["peak_bytes"] / forward["peak_bytes"]
    cuda = args.device.startswith("cuda")
    unit = "max_memory_allocated" if cuda else "peak RSS (VmHWM)"
    where = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device {where}, {args.layers} layers, batch {args.batch}x{args.seq}, ", end="")
    print(f"compute {compute_dtype_name(args)}, {args.attention} attention, {args.loss} loss, ")
    print(f"density {args.density}, trainable values {step['trainable']:,}, pid {os.getpid()}")
    if cuda:
        print(f"cap: set_per_process_memory_fraction = {args.cap_gib:g} GiB")
    for which, r in results.items():
        print(
            f"  {which:8s} {unit} after build {format_bytes(r['peak_bytes'])} "
            f"(resident before {format_bytes(r['resident_before_bytes'])}, "
            f"build peak {format_bytes(r['build_peak_bytes'])}, build {r['build_seconds']:.0f} s, "
            f"measured call {r['seconds']:.1f} s, loss {r['loss']:.4f})"
        )
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    print(f"ZO-SGD step peak / forward peak = {ratio:.3f} (target <= {TARGET_RATIO}: {verdict})")
    if cuda:
        predicted = predicted_peak_bytes(args)
        print(
            f"ZO-SGD step max_memory_allocated {format_bytes(step['peak_bytes'])} "
            f"(max_memory_reserved {format_bytes(step['reserved_peak_bytes'])}); zo plan "
            f"predicts {format_bytes(predicted)}: predicted / measured = "
            f"{predicted / step['peak_bytes']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
