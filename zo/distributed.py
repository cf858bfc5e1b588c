"""Data parallelism under ``torchrun`` / ``accelerate launch``: shards, means, one writer.

Every rank holds the whole model and draws the same seeds. A step's global batch is cut
into equal contiguous shards, one per rank. Each rank estimates on its own shard, and the
ranks then average what the estimator needs, through the :class:`DataParallel` that
:meth:`DataParallel.attach` hands to the estimator (``attach_data_parallel``, part of the
estimator contract):
- zeroth-order estimators: their projected-gradient scalars and loss, a few floats per step
  (:meth:`DataParallel.mean`);
- first-order ones: each gradient as it completes (:meth:`DataParallel.mean_`; LOMO does
  this inside backward, before its fused update).

All ranks then apply the same update. For a loss that is a mean over examples
(classification), this equals one process on the whole batch, up to float rounding. A
token-mean loss (teacher forcing) becomes the mean of the shards' token means.

Rank 0 alone writes the run directory, and replaying its trajectory in one process gives
the weights of the data-parallel run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from zo.config import ConfigError


class DataParallelError(ConfigError):
    """A run that cannot be split over the launched processes (exit 2 from the CLI)."""


# accelerate's own settings (its env vars when set by `accelerate launch` or `accelerate config`)
# that zo does not read, with the zo setting that does the same thing.
ACCELERATE_SETTINGS = {
    "ACCELERATE_USE_FSDP": "train.parallel=fsdp",
    "ACCELERATE_USE_DEEPSPEED": "train.parallel=fsdp (ZeRO-3-like sharding) or offload",
    "ACCELERATE_USE_MEGATRON_LM": "train.parallel=fsdp",
}


def refuse_accelerate_settings(environment: Mapping[str, str]) -> None:
    """A launch that asks accelerate for sharding or mixed precision would otherwise train
    without them, silently: zo takes these from its own config, never from accelerate."""
    asked = [
        f"{name} (use {setting})"
        for name, setting in ACCELERATE_SETTINGS.items()
        if environment.get(name, "false").lower() in ("true", "1", "yes")
    ]
    precision = environment.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in ("no", ""):
        asked.append(f"ACCELERATE_MIXED_PRECISION={precision} (use train.autocast={precision})")
    if asked:
        raise DataParallelError(
            "accelerate was asked for settings zo does not take from it: "
            + "; ".join(asked)
            + ". Launch with `accelerate launch --multi_gpu --num_processes N` only "
            "(no --use_fsdp/--mixed_precision, or `accelerate config` without them) and set "
            "them in the zo config"
        )


class DataParallelEstimator(Protocol):
    """The part of the estimator contract (``estimators.base.Estimator``) attached here."""

    def attach_data_parallel(self, reducer: DataParallel) -> None: ...


@dataclass(frozen=True)
class DataParallel:
    """Where this process sits among the launched ones; ``world_size == 1`` is no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> DataParallel:
        """The launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (one process when unset)."""
        accelerate_cpu = {"ACCELERATE_USE_CPU", "MASTER_ADDR"} <= os.environ.keys()
        if accelerate_cpu and "WORLD_SIZE" not in os.environ:  # MASTER_ADDR: N > 1 only
            raise DataParallelError(
                "accelerate launch asked for several processes but started this one without "
                "WORLD_SIZE/RANK (its --cpu launch runs one process, or N under mpirun, none "
                "of which know the others): use `accelerate launch --multi_gpu "
                "--num_processes N` (torchrun underneath; gloo on a CPU) or torchrun"
            )
        refuse_accelerate_settings(os.environ)
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as error:
            raise DataParallelError(
                f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({error}); launch with "
                "torchrun or accelerate, or unset them for one process"
            ) from None
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataParallelError(
                f"RANK {rank} is outside WORLD_SIZE {world_size}: launch with torchrun or "
                "accelerate, or unset them for one process"
            )
        return cls(rank, world_size, local_rank)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that logs and writes the run directory."""
        return self.rank == 0

    # ------------------------------------------------------------------ process group
    def device(self, device: torch.device) -> torch.device:
        """This rank's device: its own GPU (``LOCAL_RANK``) when training on CUDA."""
        if self.enabled and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def start(self, device: torch.device) -> None:
        """Join the process group (gloo on CPU, NCCL on CUDA); nothing for one process."""
        if not self.enabled or torch.distributed.is_initialized():
            return
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise DataParallelError(
                f"WORLD_SIZE is {self.world_size} but {' and '.join(missing)} is not set: "
                "launch with `torchrun --nproc_per_node N -m zo.cli train ...` (or accelerate "
                "launch), or unset WORLD_SIZE and RANK for one process"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend)

    def stop(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ data
    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise DataParallelError(
                f"train.batch_size {batch_size} does not split over {self.world_size} "
                f"processes: make it a multiple of {self.world_size} (it is the global batch)"
            )

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's contiguous share of a global batch (``check_batch`` first)."""
        size = len(indices) // self.world_size
        return list(indices[self.rank * size : (self.rank + 1) * size])

    # ------------------------------------------------------------------ reductions
    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean over ranks of each value (one all-reduce of a float64 vector)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._collective_device())
        torch.distributed.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def mean_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its mean over ranks, in place."""
        if self.enabled:
            torch.distributed.all_reduce(tensor)
            tensor.div_(self.world_size)

    def _collective_device(self) -> torch.device:
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def attach(self, estimator: DataParallelEstimator) -> None:
        """Make ``estimator`` average over ranks: its scalars (ZO) or gradients (first-order).
        One process attaches nothing (ZO-SGD keeps its sync-free step)."""
        if self.enabled:
            estimator.attach_data_parallel(self)
