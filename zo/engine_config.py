"""The engine's settings and the limits both engine versions share (:mod:`zo.engine` for
new runs, :mod:`zo.engine_v1` for version 1's runs import it; it imports neither)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zo.directions import DISTRIBUTIONS, GENERATOR_NAMES

LEGACY_GENERATOR = "torch-chunks-v1"
GENERATOR_CHOICES = ("auto", *GENERATOR_NAMES, LEGACY_GENERATOR)


@dataclass(frozen=True)
class EngineConfig:
    """How directions are drawn and applied. ``generator`` and ``distribution`` change every
    direction; the other fields change only speed and memory (``chunk_size`` also changes
    ``torch-chunks-v1`` directions)."""

    chunk_size: int = 0
    """Elements per chunk of per-element updates (sign, momentum, Adam) and of a large head's
    output-side perturbation (its fp32 temporary); 0 = by device: 2**20 on CPU, 2**22 on
    accelerators, where a chunk costs kernel launches."""
    threads: int = 0
    """Worker threads drawing on CPU; 0 = one per intra-op thread (max 8)."""
    distribution: str = "gaussian"
    """Direction law: ``gaussian`` or ``rademacher`` (both have E[z z^T] = I)."""
    offload_threshold: int = 1 << 22
    """Embedding / linear weights above this many elements get the output-side
    perturbation instead of a perturbed copy (saves one weight-sized temporary)."""
    offload_max_rows: int = -1
    """A large linear layer is perturbed through its output only when its input has at most
    this many rows; -1 = any number, 0 = never (weight copies). Without gradients it then
    multiplies by ``W + scale z`` block by block (:mod:`zo.output_side`): the time of a
    whole copy's matmul at 64 and at 1,024 rows, and no weight-sized temporary. A forward
    recording gradients adds ``x z^T`` instead, an extra matmul that grows with the rows."""
    generator: str = "auto"
    """``philox``, ``philox-ieee``, ``torch-blocks`` or ``torch-chunks-v1`` (version 1, kept
    for its runs); ``auto`` = philox on CUDA, philox-ieee on CPU (torch-blocks where its C
    kernel cannot be built, said once). A run records the one it used."""
    bucket_size: int = 0
    """Elements of trainable tensors a perturbed forward materialises per generator call:
    one such copy (two with ``prefetch``) is the perturbation's temporary memory (on a CPU
    one buffer reused bucket by bucket within a forward, :mod:`zo.buffer_pool`). Larger:
    fewer kernels per pass; smaller: less memory (``zo bench ops`` / ``zo bench memory``).
    0 = by device: 2**22 on CPU, 2**23 on accelerators."""
    prefetch: str = "auto"
    """Draw the next bucket while the current one computes: ``on``, ``off``, or ``auto`` (on
    for CUDA, on a side stream; off on CPU, where its thread competes with the forward's)."""

    def __post_init__(self) -> None:
        if self.chunk_size < 0:
            raise ValueError(f"engine.chunk_size must be >= 0 (0 = auto), got {self.chunk_size}")
        if self.threads < 0:
            raise ValueError(f"engine.threads must be >= 0, got {self.threads}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"engine.distribution {self.distribution!r} is unknown; "
                f"choose one of {list(DISTRIBUTIONS)}"
            )
        if self.generator not in GENERATOR_CHOICES:
            raise ValueError(
                f"engine.generator {self.generator!r} is unknown; "
                f"choose one of {list(GENERATOR_CHOICES)}"
            )
        if self.offload_max_rows < -1:
            raise ValueError(
                f"engine.offload_max_rows must be -1 (any), 0 (never) or a row count, got "
                f"{self.offload_max_rows}"
            )
        if self.bucket_size < 0:
            raise ValueError(f"engine.bucket_size must be >= 0 (0 = auto), got {self.bucket_size}")
        if self.prefetch not in ("auto", "on", "off"):
            raise ValueError(f"engine.prefetch must be auto, on or off, got {self.prefetch!r}")


class FrozenTensorError(RuntimeError):
    """Raised when something asks the engine to perturb a tensor it must not touch."""


class UnperturbedForwardError(RuntimeError):
    """A perturbed pass ran no module owning a trainable tensor: its loss cannot change."""


CPU_CHUNK = 1 << 20
ACCELERATOR_CHUNK = 1 << 22
CPU_BUCKET = 1 << 22
ACCELERATOR_BUCKET = 1 << 23

PERTURBABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def perturbs_through_output(
    config: EngineConfig, weight: torch.Tensor, module: nn.Module, args
) -> bool:
    """Perturb ``weight`` through ``module``'s output instead of a weight copy? Only where cheap.

    An embedding gathers its batch's rows of z; a linear layer multiplies by W + scale z a
    block at a time (:mod:`zo.output_side`), within ``offload_max_rows`` rows.
    """
    if weight.numel() <= config.offload_threshold or module._parameters.get("weight") is not weight:
        return False
    if type(module).forward is nn.Embedding.forward:
        return module.max_norm is None
    if type(module).forward is nn.Linear.forward and args:
        rows = args[0].numel() // max(1, args[0].shape[-1])
        return config.offload_max_rows < 0 or rows <= config.offload_max_rows
    return False
