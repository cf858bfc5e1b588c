"""A short hash of a model's weights, so a replay can check it starts from the same base."""

from __future__ import annotations

import hashlib

import torch


def model_fingerprint(model: torch.nn.Module, chunk_bytes: int = 1 << 24) -> str:
    """A short hash of the names, shapes, dtypes and bytes of every parameter and buffer.

    Runs record it so a replay can check it starts from the same base weights. Tensors are
    read ``chunk_bytes`` at a time, so hashing a GPU model copies one chunk to the host at a
    time, never a whole tensor.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise ValueError(f"cannot fingerprint {name}: it is on the meta device (no data)")
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, raw.numel(), chunk_bytes):
            digest.update(raw[start : start + chunk_bytes].cpu().numpy())
    return digest.hexdigest()[:16]
