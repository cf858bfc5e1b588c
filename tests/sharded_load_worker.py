"""One rank of tests/test_sharded_loading.py (run by ``torchrun``).

``sharded_load_worker.py OUT CHECKPOINT MASK`` loads the safetensors checkpoint
``CHECKPOINT`` three ways in the same processes, trains each with ZO-SGD on this rank's shard
of the batch, and rank 0 writes the gathered weights, step records and load measurements to
``OUT``:

* ``plain``: the whole model on every rank, data parallelism (the reference);
* ``whole``: the whole model loaded on every rank, then sharded (``train.parallel=fsdp``'s
  path before rank-by-rank loading, and still its path for tiny models);
* ``meta``: built on the meta device, sharded, each rank reading its rows from the files
  (:class:`zo.sharded_loading.MetaCheckpoint`).

Then LoRA adapters and the mask file ``MASK``'s sparse deltas (``KIND/whole``, ``KIND/meta``):
the whole load sharded against the meta build, each trained with ZO-SGD.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from sharded_worker import batch, build, train

from zo.config import TrainableConfig
from zo.distributed import DataParallel
from zo.engine import seeded
from zo.models import load_model, model_fingerprint
from zo.sharded import full_tensors, shard_for_training
from zo.sharded_loading import MetaCheckpoint
from zo.trainable import TrainableSet, select_trainable


def storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's (local) parameters."""
    storages = {}
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not local.is_meta:
            storage = local.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class CountingCheckpoint(MetaCheckpoint):
    """Counts the bytes each read returns (the fill's, and the largest single one)."""

    def __init__(self, directory: Path):
        super().__init__(directory)
        self.read_bytes, self.largest_read = 0, 0

    def read(self, name, rows=None):
        tensor = super().read(name, rows)
        size = tensor.numel() * tensor.element_size()
        self.read_bytes += size
        self.largest_read = max(self.largest_read, size)
        return tensor


def everything(model) -> TrainableSet:
    names, params = zip(*model.named_parameters(), strict=True)
    return TrainableSet(list(names), list(params))


def trained(model, parallel, sharded_units) -> tuple[dict, list]:
    optimizer = build("zo_sgd", model, True)
    if sharded_units is not None:
        from zo.sharded import sharded_estimator

        sharded_estimator(optimizer, sharded_units, True)
    parallel.attach(optimizer)
    records = train(model, optimizer, batch(parallel.rank, parallel.world_size))
    return full_tensors(dict(model.named_parameters())), records


def with_trainable(
    kind: str, spec: TrainableConfig, directory: str, parallel: DataParallel
) -> tuple[dict, dict]:
    """``kind`` on the whole load, sharded, and on the meta build, each trained: rank 0's
    tensors and metadata, keyed ``KIND/whole``, ``KIND/meta``."""
    cpu = torch.device("cpu")
    whole, _ = load_model(directory)
    with seeded(5):  # the run's trainable-init generator (build_setup seeds it alike)
        chosen = select_trainable(whole, spec)
    metadata = {f"{kind}/whole_fingerprint": model_fingerprint(whole)}
    runs = {"whole": (whole, shard_for_training(whole, cpu, chosen)[1])}
    checkpoint = MetaCheckpoint(Path(directory))
    meta, _ = checkpoint.build(None, None)
    with seeded(5):
        chosen = checkpoint.select(meta, spec)
    metadata[f"{kind}/meta_fingerprint"] = checkpoint.fingerprint(meta)
    metadata[f"{kind}/bytes_before_fill"] = str(storage_bytes(meta))
    metadata[f"{kind}/trainable_bytes"] = str(sum(p.numel() * 4 for p in chosen.params))
    runs["meta"] = (meta, shard_for_training(meta, cpu, chosen, checkpoint)[1])
    tensors = {}
    for run, (model, units) in runs.items():
        weights, records = trained(model, parallel, units)
        tensors |= {f"{kind}/{run}/{n}": t.contiguous() for n, t in weights.items()}
        metadata[f"{kind}/{run}_records"] = json.dumps(records)
    return tensors, metadata


def main(out: str, directory: str, mask: str) -> None:
    parallel = DataParallel.from_environment()
    cpu = torch.device("cpu")
    parallel.start(cpu)
    base, _ = load_model(directory)
    metadata = {"whole_fingerprint": model_fingerprint(base)}
    tensors = {f"base/{n}": p.detach().clone() for n, p in base.named_parameters()}
    runs = {"plain": (copy.deepcopy(base), None)}
    whole = copy.deepcopy(base)
    runs["whole"] = (whole, shard_for_training(whole, cpu, everything(whole))[1])

    checkpoint = CountingCheckpoint(Path(directory))
    meta, _ = checkpoint.build(None, None)
    metadata["meta_fingerprint"] = checkpoint.fingerprint(meta)
    metadata["bytes_before_fill"] = str(storage_bytes(meta))
    checkpoint.read_bytes = 0
    units = shard_for_training(meta, cpu, everything(meta), checkpoint)[1]
    metadata["bytes_after_fill"] = str(storage_bytes(meta))
    metadata["fill_read_bytes"] = str(checkpoint.read_bytes)
    metadata["largest_read"] = str(checkpoint.largest_read)
    metadata["tied"] = str(meta.lm_head.weight is meta.model.embed_tokens.weight)
    runs["meta"] = (meta, units)
    for name, buffer in meta.named_buffers():
        tensors[f"meta_buffer/{name}"] = buffer.detach().clone()
        tensors[f"whole_buffer/{name}"] = dict(base.named_buffers())[name].detach().clone()

    for run, (model, sharded_units) in runs.items():
        weights, records = trained(model, parallel, sharded_units)
        tensors |= {f"{run}/{n}": t.contiguous() for n, t in weights.items()}
        metadata[f"{run}_records"] = json.dumps(records)
    for kind, spec in [
        ("lora", TrainableConfig(kind="lora")),
        ("mask", TrainableConfig(kind="mask", path=mask)),
    ]:
        more, more_metadata = with_trainable(kind, spec, directory, parallel)
        tensors |= more
        metadata |= more_metadata
    if parallel.rank == 0:
        save_file(tensors, out, metadata=metadata)
    dist.barrier()
    parallel.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
