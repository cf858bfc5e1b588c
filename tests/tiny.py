"""Tiny models the tests share: built once per session, handed out as copies."""

from __future__ import annotations

import copy
import functools

import torch

from zo.models import tiny_model

IDS = torch.tensor([[1, 70, 71, 72, 73, 74, 2], [1, 80, 81, 82, 2, 90, 91]])
"""Two token rows inside every tiny model's vocabulary."""


@functools.cache
def _cached_tiny(family: str):
    return tiny_model(family)


def fresh_tiny(family: str = "llama"):
    """``tiny_model(family)``, built once per session and deep-copied (building is slow)."""
    model, tokenizer = _cached_tiny(family)
    return copy.deepcopy(model), tokenizer


def lively(family: str):
    """A tiny model with large random weights: tiny models at their init scale repeat the
    last token forever, which would make token-for-token comparisons vacuous."""
    model, tokenizer = tiny_model(family, seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3, generator=generator)
    return model, tokenizer
