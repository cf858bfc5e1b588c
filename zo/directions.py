"""Direction generators: the value of ``z`` at any element of any trainable tensor.

A generator maps *global coordinates* -- ``(step seed, tensor index, element offset)`` -- to
a direction value, so any element range of a tensor can be drawn alone: chunking,
bucketing, thread count and sharding never change a value (a shard draws exactly its part).
Two are registered (:func:`generators`): ``philox`` (:mod:`zo.philox`, counter-based, one
Triton kernel per pass on CUDA) and ``torch-blocks`` (:mod:`zo.torch_blocks`, torch's own
generator in seeded blocks, the fastest gaussian on CPU). This module is their registry and
re-exports what they share (:mod:`zo.direction_base`: seed mixing, the passes in torch ops,
the thread pool that runs them on CPU).

Values are bit-identical on one device type and torch version for a given generator (the
trajectory records all three).
"""

from __future__ import annotations

import torch

from zo.direction_base import (
    DISTRIBUTIONS,
    MASK32,
    MIX_START,
    PIECE,
    DirectionGenerator,
    Job,
    add_scaled,
    eager_axpz,
    mix_seed,
    mix_state,
    run_jobs,
    splitmix64,
)
from zo.philox import PhiloxGenerator
from zo.torch_blocks import TorchBlockGenerator

__all__ = [
    "DISTRIBUTIONS",
    "DirectionGenerator",
    "GENERATOR_NAMES",
    "Job",
    "MASK32",
    "MIX_START",
    "PIECE",
    "add_scaled",
    "default_generator",
    "eager_axpz",
    "generators",
    "mix_seed",
    "mix_state",
    "run_jobs",
    "splitmix64",
]


def generators() -> dict[str, type[DirectionGenerator]]:
    """The registered generators by name."""
    return {"philox": PhiloxGenerator, "torch-blocks": TorchBlockGenerator}


GENERATOR_NAMES = ("philox", "torch-blocks")


def default_generator(device: torch.device | str) -> str:
    """``auto``'s choice, by measurement: philox on CUDA (one fused kernel per bucket),
    torch-blocks on CPU (mt19937 draws gaussians ~7x faster than philox in torch ops)."""
    return "philox" if torch.device(device).type == "cuda" else "torch-blocks"
