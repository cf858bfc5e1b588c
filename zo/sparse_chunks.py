"""How a sparse-delta layer splits its tokens so its scratch stays bounded.

The gathered ``[tokens, k]`` block of a sparse-delta call is scratch: at 16x256 tokens and
Llama-2-7B's 45k-entry MLP masks it would be ~1.8 GB per call in the forward and more in the
backward. :class:`zo.sparse_delta.SparseDeltaLinear` works through the tokens in chunks
sized here. Torch-free, so the memory planner (:mod:`zo.memory.step`) predicts exactly what the
layer does without importing torch.
"""

from __future__ import annotations

SPARSE_SCRATCH_BYTES = 128 * 2**20
"""Bound on the scratch of one chunk of a sparse-delta call, forward or backward."""

FP32 = 4


def forward_bytes_per_token(k: int, out_features: int, x_bytes: int, out_bytes: int) -> int:
    """Forward scratch per token: the gathered inputs in the input dtype, their fp32 copy,
    the fp32 products; an fp32 output delta and its rounded copy when the base output is
    not fp32, else the fp32 sum."""
    gathered = k * (x_bytes + (FP32 if x_bytes != FP32 else 0) + FP32)
    delta = out_features * (2 * FP32 if out_bytes != FP32 else FP32)
    return gathered + delta


def backward_bytes_per_token(k: int, x_bytes: int, grad_bytes: int) -> int:
    """Backward scratch per token: the output gradient gathered at the mask's rows (and its
    fp32 copy), the inputs gathered at its columns (and their fp32 copy), and one fp32
    product at a time (for the values' gradient, then the input's)."""
    widen = (FP32 if grad_bytes != FP32 else 0) + (FP32 if x_bytes != FP32 else 0)
    return k * (grad_bytes + x_bytes + widen + FP32)


def chunk_tokens(bytes_per_token: int) -> int:
    """Tokens per chunk so one chunk's scratch stays under :data:`SPARSE_SCRATCH_BYTES`."""
    return max(1, SPARSE_SCRATCH_BYTES // max(1, bytes_per_token))
