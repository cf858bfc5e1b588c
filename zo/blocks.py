"""Decoder blocks found by module structure, for every family, and activation checkpointing.

A block is one repeated layer of the network (a decoder layer of Llama, OPT, Mistral,
Qwen2, an encoder layer of RoBERTa). Finding them by structure -- the longest
``nn.ModuleList`` whose children share one class -- instead of by attribute names
(``model.layers``, ``decoder.layers``, ``encoder.layer``) keeps block-wise ZO and
checkpointing free of per-family tables.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class NoBlocksError(ValueError):
    """The model has no repeated layers to treat as blocks."""


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated layers, in forward order."""
    best: list[nn.Module] = []
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        children = list(module)
        if len({type(child) for child in children}) != 1:
            continue
        if not any(True for _ in children[0].parameters()):
            continue
        if len(children) > len(best):
            best = children
    if not best:
        raise NoBlocksError(
            f"{type(model).__name__} has no nn.ModuleList of identical layers; block-wise "
            "methods and checkpointing need a model built from repeated blocks"
        )
    return best


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute each block's activations in backward instead of storing them.

    Unlike ``PreTrainedModel.gradient_checkpointing_enable``, this works in eval mode (no
    dropout, so first-order baselines stay deterministic like the ZO runs) and for any
    model with repeated blocks. Returns the number of wrapped blocks; calling it twice
    wraps nothing more.
    """
    # A KV cache would be appended to twice (forward, then recomputation); training
    # forwards never need one, and generate() follows its own generation_config.
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    wrapped = 0
    for block in decoder_blocks(model):
        if getattr(block, "_zo_checkpointed", False):
            continue
        block.forward = _checkpointed(block.forward)
        block._zo_checkpointed = True
        wrapped += 1
    return wrapped


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # inference and ZO forwards: nothing to save
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
