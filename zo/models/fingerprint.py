"""A short hash of a model's weights, so a replay can check it starts from the same base."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch


def model_fingerprint(model: torch.nn.Module, chunk_bytes: int = 1 << 24) -> str:
    """A short hash of the names, shapes, dtypes and bytes of every parameter and buffer.

    Runs record it so a replay can check it starts from the same base weights. Tensors are
    read ``chunk_bytes`` at a time, so hashing a GPU model copies one chunk to the host at a
    time, never a whole tensor.
    """
    return _fingerprint(model.state_dict().items(), chunk_bytes)


def streamed_fingerprint(
    model: torch.nn.Module, read: Callable[[str], torch.Tensor], chunk_bytes: int = 1 << 24
) -> str:
    """:func:`model_fingerprint` of ``model`` as it will be once loaded, while its parameters
    are still on the meta device: each meta entry of its ``state_dict`` is ``read(name)`` (one
    whole tensor at a time, e.g. from the checkpoint's safetensors files), the others (buffers
    computed at construction) are hashed as they are."""

    def tensors() -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in model.state_dict().items():
            if not tensor.is_meta:
                yield name, tensor
                continue
            loaded = read(name)
            if loaded.shape != tensor.shape or loaded.dtype != tensor.dtype:
                raise ValueError(
                    f"{name}: read {tuple(loaded.shape)} {loaded.dtype}, the model has "
                    f"{tuple(tensor.shape)} {tensor.dtype}"
                )
            yield name, loaded

    return _fingerprint(tensors(), chunk_bytes)


def _fingerprint(named: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int) -> str:
    digest = hashlib.sha256()
    for name, tensor in named:
        if tensor.is_meta:
            raise ValueError(f"cannot fingerprint {name}: it is on the meta device (no data)")
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, raw.numel(), chunk_bytes):
            digest.update(raw[start : start + chunk_bytes].cpu().numpy())
    return digest.hexdigest()[:16]
