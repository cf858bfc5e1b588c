"""One rank of the sharded-ZO test (run by ``torchrun``; see tests/test_sharded.py).

Trains a tiny Llama with ZO-SGD twice in the same processes: plain data parallelism (every
rank holds the model, the scalars are all-reduced) and FSDP2-sharded ZO, each rank on its
shard of the same global batch. Rank 0 writes the gathered sharded weights, the
data-parallel weights and the step records to ``argv[1]``.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from estimators.zo_sgd import ZOSGD
from zo.blocks import decoder_blocks
from zo.distributed import DataParallel
from zo.engine import EngineConfig
from zo.models import tiny_model
from zo.sharded import allocate_gather_buffers, full_tensors, shard_model, sharded_estimator

STEPS = 4


def batch(rank: int, world: int) -> torch.Tensor:
    ids = torch.randint(4, 200, (4, 9), generator=torch.Generator().manual_seed(7))
    rows = ids.shape[0] // world
    return ids[rank * rows : (rank + 1) * rows]


def train(model, optimizer, ids) -> list[dict]:
    records = []
    for _ in range(STEPS):
        optimizer.estimate(lambda: model(input_ids=ids, labels=ids).loss)
        optimizer.step()
        records.append(optimizer.last_record.to_dict())
    return records


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def main(out: str) -> None:
    parallel = DataParallel.from_environment()
    parallel.start(torch.device("cpu"))
    rank, world = parallel.rank, parallel.world_size
    ids = batch(rank, world)
    config = EngineConfig(threads=1)
    base, _ = tiny_model("llama")
    base.eval()

    plain = copy.deepcopy(base)
    plain_opt = ZOSGD(plain.parameters(), lr=1e-2, eps=1e-3, seed=3, engine=config)
    parallel.attach(plain_opt)
    plain_records = train(plain, plain_opt, ids)

    sharded = copy.deepcopy(base)
    blocks = decoder_blocks(sharded)
    shard_model(blocks)
    allocate_gather_buffers(blocks)
    sharded_opt = ZOSGD(sharded.parameters(), lr=1e-2, eps=1e-3, seed=3, engine=config)
    sharded_estimator(sharded_opt, blocks)
    parallel.attach(sharded_opt)
    local_bytes = sum(_local(p).numel() * p.element_size() for p in sharded.parameters())
    sharded_records = train(sharded, sharded_opt, ids)

    gathered = full_tensors(dict(sharded.named_parameters()))
    reference = {n: p.detach().contiguous() for n, p in plain.named_parameters()}
    full_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    if rank == 0:
        tensors = {f"sharded/{n}": t for n, t in gathered.items()}
        tensors |= {f"plain/{n}": t for n, t in reference.items()}
        tensors |= {f"base/{n}": p.detach().contiguous() for n, p in base.named_parameters()}
        metadata = {
            "plain_records": json.dumps(plain_records),
            "sharded_records": json.dumps(sharded_records),
            "local_bytes": str(local_bytes),
            "full_bytes": str(full_bytes),
            "world": str(world),
        }
        save_file(tensors, out, metadata=metadata)
    dist.barrier()
    parallel.stop()


if __name__ == "__main__":
    main(sys.argv[1])
