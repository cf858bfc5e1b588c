"""One rank of the sharded tests (run by ``torchrun``; see tests/test_sharded*.py).

``sharded_worker.py OUT NAME[,NAME..]`` trains a tiny Llama twice in the same
processes per estimator ``NAME`` (``name:variant``, see :data:`VARIANTS`), each rank on
its shard of the same global batch, and rank 0 writes both runs' weights and whole optimizer
state (``NAME/plain/...``, ``NAME/sharded/...``) to ``OUT``:

* zeroth-order estimators: plain data parallelism (every rank holds the model, the scalars
  are all-reduced) against FSDP2-sharded ZO; the step records go along for replay;
* first-order ones (sgd, adamw, lomo): one process on the whole batch (the reference)
  against FSDP2 (gradients reduce-scattered, the optimizer on DTensor shards).
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

import estimators
from zo.blocks import decoder_blocks
from zo.distributed import DataParallel
from zo.engine import EngineConfig, seeded
from zo.models import tiny_model
from zo.sharded import allocate_gather_buffers, full_tensors, shard_model, sharded_estimator
from zo.sparse_delta import apply_sparse_deltas
from zo.trainable import add_lora

STEPS = 4
SETTINGS = {"lr": 1e-2, "eps": 1e-3}
FIRST_ORDER = {"sgd": {"lr": 1e-1}, "adamw": {"lr": 1e-3}, "lomo": {"lr": 1e-1}}
VARIANTS = {
    "clip": {"clip_grad_norm": 0.5},
    "queries": {"queries": 2},
    "mask": {},
    "relative": {"scale": "relative"},
    "lora": {},
    "": {},
}
"""``NAME:VARIANT`` settings on top (LOMO's two-pass clipping, two ZO queries); ``mask``
trains sparse deltas over the block matrices (:func:`random_mask`), ``lora`` LoRA adapters
(peft, on q_proj and v_proj; B starts at zero, so A and B both move only from step 2 on)."""


def random_mask(model) -> dict[str, torch.Tensor]:
    """Flat indices of ~5% of each block linear's entries (some layers' counts do not divide
    by the world size, so shards differ in length)."""
    generator = torch.Generator().manual_seed(11)
    indices = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            numel = module.weight.numel()
            picked = torch.randperm(numel, generator=generator)[: numel // 20 + 1]
            indices[f"{name}.weight"] = picked.sort().values.to(torch.int32)
    return indices


def batch(rank: int, world: int) -> torch.Tensor:
    ids = torch.randint(4, 200, (4, 9), generator=torch.Generator().manual_seed(7))
    rows = ids.shape[0] // world
    return ids[rank * rows : (rank + 1) * rows]


def build(choice: str, model, zeroth_order: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    name, _, variant = choice.partition(":")
    settings = {**(FIRST_ORDER[name] if not zeroth_order else SETTINGS), **VARIANTS[variant]}
    spec = estimators.get_estimator(name)
    config = spec.config_class(**settings)
    return estimators.build_estimator(name, params, config, seed=3, engine=EngineConfig(threads=1))


def train(model, optimizer, ids) -> list[dict]:
    records = []
    for _ in range(STEPS):
        optimizer.step(lambda: model(input_ids=ids, labels=ids).loss)
        if optimizer.last_record is not None:
            records.append(optimizer.last_record.to_dict())
    return records


def state_tensors(optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """The optimizer's (whole) per-element state, as ``prefix/index/key``."""
    out = {}
    for index, entries in optimizer.state_dict()["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                out[f"{prefix}/{index}/{key}"] = value.detach().cpu().contiguous()
    return out


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def compare(name: str, parallel: DataParallel, base) -> tuple[dict, dict]:
    """Train ``name`` unsharded and sharded; rank 0's tensors and metadata, keyed by name."""
    rank, world = parallel.rank, parallel.world_size
    zeroth_order = estimators.get_estimator(name.partition(":")[0]).traits.zeroth_order
    if name.endswith(":mask"):
        base = copy.deepcopy(base)
        apply_sparse_deltas(base, random_mask(base))
    if name.endswith(":lora"):
        base = copy.deepcopy(base)
        with seeded(5):
            add_lora(base)
    plain = copy.deepcopy(base)
    plain_opt = build(name, plain, zeroth_order)
    if zeroth_order:
        parallel.attach(plain_opt)
        plain_records = train(plain, plain_opt, batch(rank, world))
    else:  # the reference: one process on the whole batch
        plain_records = train(plain, plain_opt, batch(0, 1))

    sharded = copy.deepcopy(base)
    blocks = decoder_blocks(sharded)
    shard_model(blocks)
    allocate_gather_buffers(blocks)
    sharded_opt = build(name, sharded, zeroth_order)
    sharded_estimator(sharded_opt, blocks, zeroth_order)
    parallel.attach(sharded_opt)
    local_bytes = sum(_local(p).numel() * p.element_size() for p in sharded.parameters())
    # FSDP2 has no public getter for a root's communication context; what sharing it saves
    # (one retained reduce-scatter input in all, not one per block) is memory, measured in
    # experiments/RESULTS.md
    contexts = {id(block._get_fsdp_state()._comm_ctx) for block in blocks}
    sharded_records = train(sharded, sharded_opt, batch(rank, world))

    gathered = full_tensors(dict(sharded.named_parameters()))
    sharded_state = state_tensors(sharded_opt, f"{name}/sharded_state")  # a collective
    tensors = {f"{name}/sharded/{n}": t for n, t in gathered.items()}
    tensors |= {f"{name}/plain/{n}": p.detach().contiguous() for n, p in plain.named_parameters()}
    tensors |= {f"{name}/base/{n}": p.detach().clone() for n, p in base.named_parameters()}
    tensors |= sharded_state | state_tensors(plain_opt, f"{name}/plain_state")
    metadata = {
        f"{name}/plain_records": json.dumps(plain_records),
        f"{name}/sharded_records": json.dumps(sharded_records),
        f"{name}/local_bytes": str(local_bytes),
        f"{name}/comm_contexts": str(len(contexts)),
    }
    return tensors, metadata


def main(out: str, names: list[str]) -> None:
    parallel = DataParallel.from_environment()
    parallel.start(torch.device("cpu"))
    base, _ = tiny_model("llama")
    base.eval()
    tensors = {f"base/{n}": p.detach().contiguous() for n, p in base.named_parameters()}
    metadata = {
        "full_bytes": str(sum(p.numel() * p.element_size() for p in base.parameters())),
        "world": str(parallel.world_size),
    }
    for name in names:
        more_tensors, more_metadata = compare(name, parallel, base)
        tensors |= more_tensors
        metadata |= more_metadata
    if parallel.rank == 0:
        save_file(tensors, out, metadata=metadata)
    dist.barrier()
    parallel.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else ["zo_sgd"])
