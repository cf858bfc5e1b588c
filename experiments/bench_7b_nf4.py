"""Llama-2-7B shape, NF4 base, 0.1% sparse fp32 delta: ZO-SGD step peak vs forward peak.

Each measurement runs in a fresh process (this script re-invoked with ``--measure``):
build the random NF4 model layer by layer (:func:`zo.quant.build_random_quantized`), add
sparse deltas at a random 0.1% of every decoder linear weight (a sensitivity mask needs
gradients of the real model; a random mask of the same density costs the same memory), then

* ``forward``: one forward of a 1 x 64 batch (the loss closure, under ``no_grad``);
* ``zo_step``: one ZO-SGD step (two perturbed forwards and the update) on the same batch.

Peaks are taken after the build (CPU: VmHWM reset through ``/proc/self/clear_refs``; CUDA:
``max_memory_allocated`` after ``reset_peak_memory_stats``), so the ratio compares the
training step with inference, not with the build; the build's own peak is printed too.

    .venv/bin/python experiments/bench_7b_nf4.py                  # CPU, several minutes
    .venv/bin/python experiments/bench_7b_nf4.py --layers 2       # quick check of the plumbing
    python experiments/bench_7b_nf4.py --device cuda --cap-gib 8  # GPU, 8 GiB cap (untested here)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zo.memory import (  # noqa: E402
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


def random_mask(model: torch.nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Sorted unique int32 indices at ``density`` of every 4-bit decoder linear weight."""
    generator = torch.Generator().manual_seed(seed)
    mask = {}
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        numel = module.out_features * module.in_features
        k = max(1, round(numel * density))
        # sample with replacement, keep unique, top up: no numel-sized permutation
        picked = torch.empty(0, dtype=torch.int64)
        while picked.numel() < k:
            draw = torch.randint(numel, (k - picked.numel() + k // 50 + 16,), generator=generator)
            picked = torch.unique(torch.cat([picked, draw]))
        keep = torch.randperm(picked.numel(), generator=generator)[:k]
        mask[name + ".weight"] = picked[keep].sort().values.to(torch.int32)
    return mask


def measure(args: argparse.Namespace) -> dict:
    import estimators
    from zo.quant import build_random_quantized
    from zo.sparse_delta import apply_sparse_deltas

    device = torch.device(args.device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), device)
    elif not args.default_malloc:
        return_large_frees_to_os()
    compute = getattr(torch, args.compute_dtype)
    started = time.perf_counter()
    model = build_random_quantized(
        llama2_7b_config(args.layers),
        compute_dtype=compute,
        float_dtype=getattr(torch, args.float_dtype),
        seed=0,
        device=device,
    )
    named = apply_sparse_deltas(model, random_mask(model, args.density, seed=1))
    build_seconds = time.perf_counter() - started
    build_peak = peak_rss_bytes() if device.type == "cpu" else torch.cuda.max_memory_allocated()
    ids = torch.randint(
        32000, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(2)
    ).to(device)

    def closure() -> torch.Tensor:
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))

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
    return {
        "measure": args.measure,
        "peak_bytes": peak_memory_bytes(device),
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
    parser.add_argument("--compute-dtype", default="float32", help="4-bit layers' compute dtype")
    parser.add_argument("--float-dtype", default="bfloat16", help="embeddings and head")
    parser.add_argument("--default-malloc", action="store_true")
    parser.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    results = {which: run_fresh(args, which) for which in MEASUREMENTS}
    forward, step = results["forward"], results["zo_step"]
    ratio = step["peak_bytes"] / forward["peak_bytes"]
    unit = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)"
    print(f"device {args.device}, {args.layers} layers, batch {args.batch}x{args.seq}, ", end="")
    print(f"density {args.density}, trainable values {step['trainable']:,}, pid {os.getpid()}")
    for which, r in results.items():
        print(
            f"  {which:8s} {unit} after build {format_bytes(r['peak_bytes'])} "
            f"(resident before {format_bytes(r['resident_before_bytes'])}, "
            f"build peak {format_bytes(r['build_peak_bytes'])}, build {r['build_seconds']:.0f} s, "
            f"measured call {r['seconds']:.1f} s, loss {r['loss']:.4f})"
        )
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    print(f"ZO-SGD step peak / forward peak = {ratio:.3f} (target <= {TARGET_RATIO}: {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
