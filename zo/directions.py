"""Direction generators: the value of ``z`` at any element of any trainable tensor.

A generator maps *global coordinates* -- ``(step seed, tensor index, element offset)`` -- to
a direction value, so any element range of a tensor can be drawn alone: chunking,
bucketing, thread count and sharding never change a value (a shard draws exactly its part).
Three are registered (:func:`generators`): ``philox`` (:mod:`zo.philox`, counter-based, one
Triton kernel per pass on CUDA), ``philox-ieee`` (:mod:`zo.philox_ieee`, philox's counters
with a transform in exact arithmetic: the same bits on every device, a fused C kernel on
CPU) and ``torch-blocks`` (:mod:`zo.torch_blocks`, torch's own generator in seeded blocks).
This module is their registry and re-exports what they share (:mod:`zo.direction_base`: seed
mixing, the passes in torch ops, the thread pool that runs them on CPU).

Values are bit-identical on one device type and torch version for a given generator (the
trajectory records all three); ``philox-ieee``'s on every device.
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
    say_once,
    splitmix64,
)
from zo.native import NativeUnavailable
from zo.philox import PhiloxGenerator
from zo.philox_ieee import PhiloxIEEEGenerator, native_kernel
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
    return {
        "philox": PhiloxGenerator,
        "philox-ieee": PhiloxIEEEGenerator,
        "torch-blocks": TorchBlockGenerator,
    }


GENERATOR_NAMES = ("philox", "philox-ieee", "torch-blocks")


def default_generator(device: torch.device | str) -> str:
    """``auto``'s choice, by measurement (``zo bench generators``, ``zo bench step``):
    philox on CUDA (one fused Triton kernel per bucket); philox-ieee on CPU, whose C kernel
    draws, scales and adds in one pass at ~2x torch's own generator; torch-blocks on a CPU
    where that kernel cannot be built (no C compiler), said once with the reason."""
    if torch.device(device).type == "cuda":
        return "philox"
    if torch.device(device).type != "cpu":
        return "torch-blocks"
    try:
        native_kernel()
    except NativeUnavailable as error:
        say_once(f"engine.generator=auto draws with torch-blocks on this CPU: {error}", __name__)
        return "torch-blocks"
    return "philox-ieee"
