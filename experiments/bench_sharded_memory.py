"""Per-rank memory and step time of sharded (FSDP2) vs data-parallel training, random weights.

    torchrun --standalone --nproc_per_node N experiments/bench_sharded_memory.py \
        --mode fsdp|data [--estimator zo_sgd|zo_adam|adamw|sgd|lomo] \
        [--hidden 1024 --layers 16 --inter 2816 --vocab 32000] [--load whole|rows DIR]
        [--trainable full|lora]
    python experiments/bench_sharded_memory.py --save DIR [shape]   # a random checkpoint

``--load`` reads a safetensors checkpoint (one ``--save`` wrote) as ``zo train`` does:
``whole`` loads the whole model on every rank and then shards it (``fsdp``: the path before
rank-by-rank loading), ``rows`` builds it on the meta device, shards it and reads each
rank's rows from the files (:mod:`zo.sharded_loading`); ``peak_rss_after_load`` is the
peak resident set (max over ranks) when the model is loaded, before any step. ``--trainable
lora`` (with ``--load``) trains ``zo train``'s default LoRA adapters (r 8 on q_proj, v_proj,
A drawn from a fixed seed) instead of every weight.

Each rank builds a Llama of the given shape with random weights. ``fsdp`` builds it on the
meta device, shards the decoder blocks and materialises only this rank's rows (what a
sharded loader does), so the peak RSS is the run's, not a whole-model build's; the
estimator then runs as ``train.parallel=fsdp`` runs it (:func:`zo.sharded.sharded_estimator`).
Rank 0 prints one JSON line: per-rank resident parameter bytes, peak RSS (max over ranks),
the planner's per-rank prediction (:func:`zo.memory.parallel.plan_sharded`, or
``plan_memory`` for data parallelism) and seconds per step (mean of the steps after the
first).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import estimators
from zo.blocks import decoder_blocks
from zo.distributed import DataParallel
from zo.engine import EngineConfig
from zo.memory import return_large_frees_to_os
from zo.memory.parallel import plan_sharded
from zo.memory.shapes import PlanError, shape_from_hf_config
from zo.memory.step import PlanRequest, plan_memory
from zo.sharded import allocate_gather_buffers, shard_model, sharded_estimator

SETTINGS = {"lr": 1e-6}
ZO_SETTINGS = {"lr": 1e-6, "eps": 1e-3}


def llama_config(options) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=options.hidden,
        num_hidden_layers=options.layers,
        intermediate_size=options.inter,
        num_attention_heads=options.hidden // 64,
        num_key_value_heads=options.hidden // 64,
        vocab_size=options.vocab,
        tie_word_embeddings=False,
    )


def build(options, sharded: bool):
    config = llama_config(options)
    if not sharded:
        return LlamaForCausalLM(config).eval(), []
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    units = decoder_blocks(model)
    shard_model(units, init_device_mesh("cpu", (dist.get_world_size(),)))
    model.to_empty(device="cpu")  # the blocks: this rank's rows only; the rest whole
    with torch.no_grad():
        for param in model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            local.normal_(0, 0.02)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were on meta
    allocate_gather_buffers(units)
    return model.eval(), units


def load(options, sharded: bool):
    """The checkpoint in ``options.load[1]``, whole (then sharded) or rank by rank."""
    from pathlib import Path

    from zo.config import TrainableConfig
    from zo.engine import seeded
    from zo.models import load_model
    from zo.sharded import shard_for_training
    from zo.sharded_loading import MetaCheckpoint
    from zo.trainable import select_trainable

    how, directory = options.load
    checkpoint = MetaCheckpoint(Path(directory)) if how == "rows" else None
    model = checkpoint.build(None, None)[0] if checkpoint else load_model(directory)[0]
    spec = TrainableConfig(kind=options.trainable)
    with seeded(0):  # LoRA's A matrices
        trainable = checkpoint.select(model, spec) if checkpoint else select_trainable(model, spec)
    if not sharded:
        return model, []
    units = shard_for_training(model, torch.device("cpu"), trainable, checkpoint)[1]
    return model.eval(), units


def save(options) -> None:
    from zo.models import tiny_model

    LlamaForCausalLM(llama_config(options)).save_pretrained(options.save)
    tiny_model("llama")[1].save_pretrained(options.save)  # any tokenizer: loading needs one


def predicted(options, ranks: int) -> int | None:
    """The planner's per-rank peak, or None where it has no plan (sharded LoRA)."""
    spec = estimators.get_estimator(options.estimator)
    request = PlanRequest(
        shape=shape_from_hf_config(llama_config(options).to_dict()),
        estimator=spec.planned(),
        trainable=options.trainable,
        device="cpu",
        batch=options.batch,
        seq_len=options.seq,
        logits="full",
    )
    if options.mode == "data":
        return plan_memory(request).process_total
    try:
        return plan_sharded(request, ranks).device_peak
    except PlanError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["fsdp", "data"])
    parser.add_argument("--estimator", default="zo_sgd")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--load", nargs=2, metavar=("whole|rows", "DIR"))
    parser.add_argument("--save", metavar="DIR")
    parser.add_argument("--trainable", choices=["full", "lora"], default="full")
    options = parser.parse_args()
    if options.save:
        return save(options)
    if options.mode is None:
        parser.error("--mode fsdp|data is required (or --save DIR)")
    if options.trainable != "full" and not options.load:
        parser.error("--trainable lora needs --load whole|rows DIR (a checkpoint to adapt)")
    return_large_frees_to_os()
    parallel = DataParallel.from_environment()
    parallel.start(torch.device("cpu"))
    sharded = options.mode == "fsdp"
    model, units = load(options, sharded) if options.load else build(options, sharded)
    loaded = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])
    if parallel.enabled:
        dist.all_reduce(loaded, op=dist.ReduceOp.MAX)
    spec = estimators.get_estimator(options.estimator)
    config = spec.config_class(**(ZO_SETTINGS if spec.traits.zeroth_order else SETTINGS))
    optimizer = estimators.build_estimator(
        spec.name,
        [p for p in model.parameters() if p.requires_grad],
        config,
        engine=EngineConfig(threads=1),
    )
    if units:
        sharded_estimator(optimizer, units, spec.traits.zeroth_order)
    parallel.attach(optimizer)
    local = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in model.parameters()
    )
    ids = torch.randint(4, options.vocab, (options.batch, options.seq))
    times = []
    for _ in range(options.steps):
        started = time.perf_counter()
        optimizer.step(lambda: model(input_ids=ids, labels=ids).loss)
        times.append(time.perf_counter() - started)
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])
    if parallel.enabled:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if parallel.is_main:
        total = sum(p.numel() for p in model.parameters())
        blocks = sum(p.numel() for b in decoder_blocks(model) for p in b.parameters())
        prediction = predicted(options, parallel.world_size)
        result = {
            "mode": options.mode,
            "estimator": spec.name,
            "ranks": parallel.world_size,
            "parameters": total,
            "block_parameters": blocks,
            "rank0_parameter_bytes": local,
            "load": " ".join(options.load or ["random"]),
            "trainable": options.trainable,
            "peak_rss_after_load": int(loaded),
            "peak_rss_bytes_max_rank": int(peak),
            "predicted_peak_bytes": prediction,
            "error": round(prediction / int(peak) - 1, 4) if prediction else None,
            "seconds_per_step": sum(times[1:]) / max(1, len(times) - 1),
        }
        print(json.dumps(result))
    parallel.stop()


if __name__ == "__main__":
    main()
