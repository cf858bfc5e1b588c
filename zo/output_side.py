"""Large embeddings and linear layers perturbed without a weight-sized copy.

A perturbed forward (:mod:`zo.buckets`) copies most trainable tensors, a bucket at a time.
A weight above ``engine.offload_threshold`` elements (an LM head, a tied embedding) is not
copied; instead:

* an embedding gathers its batch's rows of ``z`` and adds them to its output;
* a linear layer in a forward without gradients computes ``x @ (W + scale z)^T`` a block of
  output features at a time (:func:`perturbed_linear`): its own forward multiplies by zero
  features (:func:`skip_matmul`), so the cost is the plain matmul plus the draw, and the
  values equal the layer's on a perturbed copy;
* a linear layer in a forward that records gradients adds ``scale * x @ z^T`` to its own
  output (:func:`added_to_output`): the blocks above share one buffer, which autograd could
  not save.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.functional import linear

if TYPE_CHECKING:
    from zo.buckets import Swap
    from zo.engine import PerturbationEngine


def skip_matmul(module: nn.Linear, restore: list[Swap]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Let a linear layer's own forward multiply by zero output features (it still checks
    the input's shape and dtype), putting the parameters back through ``restore``. Returns
    the weight and the bias the call would have used (a trainable bias: its perturbed copy)."""
    weight, bias = module._parameters["weight"], module._parameters.get("bias")
    restore.append((module, "weight", weight))
    module._parameters["weight"] = weight[:0]
    if bias is not None:
        if not any(owner is module and name == "bias" for owner, name, _ in restore):
            restore.append((module, "bias", bias))
        module._parameters["bias"] = bias[:0]
    return weight, bias


def perturbed_linear(
    engine: PerturbationEngine,
    weight: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    seed: int,
    scale: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``x @ (W + scale * z)^T + bias`` in ``dtype`` (what the layer's own call gave, on zero
    features: autocast's choice included), a block of output features at a time: each block's
    perturbed rows are drawn into one chunk-sized buffer (computed in fp32 and rounded once
    to W's dtype, as a bucket copy is) and multiplied at once. Neither a weight-sized copy
    nor a second matmul with ``z`` is needed (``experiments/RESULTS.md``). With blocks of
    more than a few features, the values equal the layer's on a perturbed copy bit for bit
    (BLAS sums each output the same way; tested)."""
    index = engine.positions[id(weight)]
    features, row = weight.shape
    # under autocast, F.linear picks the arithmetic the layer's own call would
    autocast = torch.is_autocast_enabled(x.device.type)
    out = torch.empty((*x.shape[:-1], features), dtype=dtype, device=x.device)
    columns, rows_in = out.view(-1, features), x.reshape(-1, row)
    per_block = max(1, engine.chunk_len(index) // row)
    buffer = torch.empty(min(per_block, features) * row, dtype=weight.dtype, device=x.device)
    flat, one = weight.detach().reshape(-1), engine.constant((1.0, 1.0), weight.device)
    for first in range(0, features, per_block):
        last = min(first + per_block, features)
        block, start = buffer[: (last - first) * row], first * row
        engine.axpz_at(
            [flat[start : last * row]], [block], [index], [seed], one, scale,
            starts=[engine.offsets[index] + start],
        )  # fmt: skip
        block, part = block.view(-1, row), None if bias is None else bias[first:last]
        if autocast:
            columns[:, first:last] = linear(rows_in, block, part)
        elif part is None:
            torch.mm(rows_in, block.t(), out=columns[:, first:last])
        else:  # F.linear's own fused form: the same bits as the layer on a copy
            torch.addmm(part, rows_in, block.t(), out=columns[:, first:last])
    return out


def added_to_output(
    engine: PerturbationEngine, module: nn.Module, args, output, seed: int, scale: float
) -> torch.Tensor:
    """The perturbation's effect added to an embedding's output (its batch's rows of ``z``),
    or to a linear layer's (``scale * x @ z^T``, chunk by chunk in fp32)."""
    weight = module._parameters["weight"]
    index = engine.positions[id(weight)]
    output = output.clone() if output.requires_grad else output
    if isinstance(module, nn.Embedding):
        rows = output.view(-1, weight.shape[1])
        engine.generator.rows_add(rows, args[0], seed, index, tuple(weight.shape), scale)
        return output
    out_cols = output.view(-1, output.shape[-1])
    x = args[0].reshape(-1, args[0].shape[-1])
    x = x if x.dtype == torch.float32 else x.float()
    row = weight.shape[1]
    rows_per_chunk = max(1, engine.chunk_len(index) // row)
    z = torch.empty(min(rows_per_chunk, weight.shape[0]) * row, device=weight.device)
    for first in range(0, weight.shape[0], rows_per_chunk):
        last = min(first + rows_per_chunk, weight.shape[0])
        block = z[: (last - first) * row]
        engine.fill(block, seed, index, engine.offsets[index] + first * row)
        block = block.view(-1, row)
        if out_cols.dtype == torch.float32:
            out_cols[:, first:last].addmm_(x, block.t(), alpha=scale)
        else:
            cols = out_cols[:, first:last]
            cols.copy_(torch.addmm(cols.float(), x, block.t(), alpha=scale))
    return output
