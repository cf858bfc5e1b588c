"""Offloaded ZO-SGD on one GPU: step time and device peak, plain vs offloaded, overlap vs none.

    python experiments/bench_offload.py --device cuda [--hidden 2048 --layers 16 --inter 5504
        --vocab 32000 --dtype bfloat16 --prefetch 1 2 --steps 4 --batch 4 --seq 256]

One process builds a Llama of the given shape with random weights (on the host), then times
ZO-SGD steps (median of the steps after the first) and reads the device peak
(``max_memory_allocated``) for: the plain run (whole model on the device), offload without
overlap (``streams=off``: each block's copy waited for on the compute stream) and offload
with overlap (pinned memory, side stream) for each ``--prefetch`` k. It prints one JSON line
with the ratios: ``overlap_speedup_k`` = no-overlap seconds / overlap seconds (the copies the
side stream hides), ``offload_over_plain_k`` (what streaming costs), ``peak_over_plain_k``.
Blocks are perturbed and updated at home (the host's CPU draws their directions): on a fast
GPU that, not the copy, may bound the step; the no-overlap line separates the two.
On a CPU-only machine (``--device cpu``) the host is the device: the numbers measure the
schedule's overhead only.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from bench_sharded_memory import llama_config  # this folder: on sys.path when run as a script
from transformers import LlamaForCausalLM

from estimators.zo_sgd import ZOSGD
from zo.engine import EngineConfig
from zo.offload import offload_blocks


def build(options) -> LlamaForCausalLM:
    config = llama_config(options)  # the shape bench_sharded_memory.py measures
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(getattr(torch, options.dtype)).eval()


def measure(model, device: torch.device, options) -> dict:
    ids = torch.randint(0, options.vocab, (options.batch, options.seq), device=device)
    optimizer = ZOSGD(model.parameters(), lr=1e-6, eps=1e-3, seed=0, engine=EngineConfig())
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(options.steps):
        synchronize()
        start = time.perf_counter()
        optimizer.step(lambda: model(input_ids=ids, labels=ids).loss)
        synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"seconds": statistics.median(seconds[1:] or seconds), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--inter", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--skip-plain", action="store_true", help="the model does not fit")
    options = parser.parse_args()
    device = torch.device(options.device)
    base = build(options)
    result: dict = {
        "benchmark": "offload",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": f"llama h{options.hidden} L{options.layers} i{options.inter} v{options.vocab}",
        "dtype": options.dtype,
        "batch": f"{options.batch}x{options.seq}",
        "parameters": sum(p.numel() for p in base.parameters()),
    }
    runs = {}
    if not options.skip_plain:
        runs["plain"] = measure(copy.deepcopy(base).to(device), device, options)
    for k in options.prefetch:
        for streams in ("off", "auto"):
            model = copy.deepcopy(base)
            offload_blocks(model, device, k, streams)
            runs[f"offload_{streams}_k{k}"] = measure(model, device, options)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["runs"] = runs
    for k in options.prefetch:
        overlap, serial = runs[f"offload_auto_k{k}"], runs[f"offload_off_k{k}"]
        result[f"overlap_speedup_k{k}"] = round(serial["seconds"] / overlap["seconds"], 3)
        if "plain" in runs:
            plain = runs["plain"]
            result[f"offload_over_plain_k{k}"] = round(overlap["seconds"] / plain["seconds"], 3)
            if plain["peak_bytes"]:
                result[f"peak_over_plain_k{k}"] = round(
                    overlap["peak_bytes"] / plain["peak_bytes"], 3
                )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
