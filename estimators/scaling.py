"""Scale-aware steps (``estimator.scale``): ZO in each tensor's own units.

``absolute`` (the default): ``eps`` and ``lr`` move every trainable tensor by the same
amount, whatever its size. ``relative``: each tensor ``i`` gets a scale
``s_i = max(RMS(W_i at the start of the run), scale_floor)`` and the estimator runs in the
coordinates ``u_i = W_i / s_i``: its perturbation is ``eps * s_i * z`` and its update ``s_i``
times the update it would make on ``u``. The same ``lr``/``eps`` then give the same relative
moves however a family parametrises a tensor (a gain of 1 or of 50, ``w`` or ``1 + w``): a
reparametrisation ``W' = c W`` (the forward dividing by ``c``) leaves the run unchanged.

The scales are computed once, when the optimizer is built on the run's starting weights, and
recorded (optimizer state, trajectory header with a checksum), so resume and replay use the
same numbers bit for bit. Memory: one float per tensor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zo.sharded_optim import is_sharded

SCALE_MODES = ("absolute", "relative")
_RMS_CHUNK = 1 << 20


@dataclass
class ScaleConfig:
    scale: str = "absolute"
    """``absolute``: lr and eps in the weights' units; ``relative``: in units of each tensor's
    RMS at the start of the run (settings that carry across parametrisations)."""
    scale_floor: float = 1e-3
    """Smallest scale of a tensor under ``relative`` (a tensor that starts at or near zero,
    e.g. LoRA's B or a bias, moves in absolute units of this size)."""

    def __post_init__(self) -> None:
        # the mode here; scale_floor's range with the other settings (check_hyperparameters)
        if self.scale not in SCALE_MODES:
            raise ValueError(f"scale {self.scale!r} is unknown; choose one of {list(SCALE_MODES)}")


def check_scale(mode: str, floor: float) -> None:
    if mode not in SCALE_MODES:
        raise ValueError(f"scale {mode!r} is unknown; choose one of {list(SCALE_MODES)}")
    if not floor > 0:
        raise ValueError(f"scale_floor must be > 0, got {floor}")


def rms(tensor: torch.Tensor) -> float:
    """Root mean square in fp64, chunk by chunk (no tensor-sized temporary but, for an FSDP2
    shard, the gathered tensor: the same sum in the same order as one process's)."""
    flat = (tensor.full_tensor() if is_sharded(tensor) else tensor).detach().reshape(-1)
    if flat.numel() == 0:
        return 0.0
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _RMS_CHUNK):
        total += flat[start : start + _RMS_CHUNK].to(torch.float64).square().sum()
    return float((total / flat.numel()).sqrt())


def tensor_scales(tensors: Sequence[torch.Tensor], mode: str, floor: float) -> list[float] | None:
    """Each tensor's scale under ``mode`` (None for ``absolute``: no scaling at all)."""
    check_scale(mode, floor)
    if mode == "absolute":
        return None
    return [max(rms(tensor), floor) for tensor in tensors]


def checksum(scales: Sequence[float]) -> str:
    """sha256 of the scales as JSON (floats written exactly, as ``repr`` does)."""
    return hashlib.sha256(json.dumps([float(s) for s in scales]).encode()).hexdigest()


def header_entry(scales: Sequence[float] | None) -> dict | None:
    return None if scales is None else {"values": list(scales), "sha256": checksum(scales)}


def check_header_entry(entry: dict, scales: Sequence[float] | None, where: str) -> None:
    """Refuse a damaged record, or weights whose scales differ from the recorded ones."""
    values = entry.get("values")
    if not isinstance(values, list) or checksum(values) != entry.get("sha256"):
        raise ValueError(f"{where}: tensor_scales do not match their sha256 (damaged file)")
    if scales is None or [float(v) for v in values] != list(scales):
        raise ValueError(
            f"{where}: the recorded tensor scales differ from the ones computed on these "
            "starting weights (another base model, trainable set, device type or torch version)"
        )
