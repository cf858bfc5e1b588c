"""Access to a language model's parts: its backbone and LM head, its device, eval mode,
and which batch layout it reads (`scorer_for`: causal or masked LM, never by family name).

Only the hidden states at scored positions reach the LM head (`head_logits`), so callers
compute logits of [scored positions, vocab] instead of [sequences, length, vocab].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tasks.base import TaskError
from tasks.encoding import (
    CandidateBatch,
    MaskedCandidateBatch,
    ScoringRow,
    encode_masked_rows,
    encode_rows,
)
from tasks.kv_cache import why_no_kv_cache


def unwrapped(model: nn.Module) -> nn.Module:
    # A PEFT wrapper is looked through: the adapters are injected into the wrapped
    # model's layers, and the wrapper's own `base_model` is the LoRA container.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_masked_lm(model: nn.Module) -> bool:
    """A transformers *ForMaskedLM model (or a subclass, or one wrapped by PEFT)."""
    return any(cls.__name__.endswith("ForMaskedLM") for cls in type(unwrapped(model)).__mro__)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer without its LM head, and the head that maps hidden states to logits.

    `base_model` is the backbone of every transformers *ForCausalLM and *ForMaskedLM
    (LlamaModel, OPTModel (its decoder applies the final layer norm), RobertaModel...).
    The head is the model's child that holds the output embedding: the embedding itself
    for causal LMs, RoBERTa's `lm_head` (dense, GELU, layer norm, then the embedding).
    """
    model = unwrapped(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", model)
    head = None
    if output is not None and backbone is not model:
        head = next(
            (
                child
                for child in model.children()
                if child is not backbone and any(m is output for m in child.modules())
            ),
            None,
        )
    if head is None:
        raise TaskError(
            f"{type(model).__name__} is not a language model with a separate backbone and LM "
            "head (expected a transformers *ForCausalLM or *ForMaskedLM model)"
        )
    return backbone, head


def _softcap(model: nn.Module) -> float | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):  # multimodal configs nest the LM's settings
        config = config.get_text_config()
    return getattr(config, "final_logit_softcapping", None)


def head_logits(model: nn.Module, head: nn.Module, hidden: Tensor) -> Tensor:
    """fp32 logits of some hidden states, as the model's forward would compute them."""
    logits = head(hidden).float()  # the head runs in the model's dtype, as in forward()
    cap = _softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


Encoder = Callable[[Any, Sequence[ScoringRow], int], CandidateBatch]


def why_no_prefix_cache(model: nn.Module) -> str | None:
    """Why the backbone cannot continue a shared prompt from its KV cache at given
    positions (`tasks.prefix_cache`); None where it can."""
    try:
        backbone, _ = backbone_and_head(model)
    except TaskError as error:
        return str(error)
    return why_no_kv_cache(backbone)


def accepts_prefix_cache(model: nn.Module) -> bool:
    return why_no_prefix_cache(model) is None


@dataclass(frozen=True)
class Scorer:
    """How one kind of language model reads rows: which models, their batch layout, and
    why a model cannot reuse a shared prompt's KV cache (`tasks.prefix_cache`)."""

    name: str
    applies_to: Callable[[nn.Module], bool]
    encode: Encoder
    layout: type[CandidateBatch]
    prefix_cache: Callable[[nn.Module], str | None] | None = None
    """None: the layout reads each prompt in one pass with its candidates, by design."""


# First match wins; the causal layout is the fallback for every other LM. A masked LM
# reads the whole prompt around <mask> in one bidirectional pass: no prefix to cache.
SCORERS: list[Scorer] = [
    Scorer("masked_lm", is_masked_lm, encode_masked_rows, MaskedCandidateBatch),
    Scorer("causal_lm", lambda model: True, encode_rows, CandidateBatch, why_no_prefix_cache),
]

PREFIX_CACHE_MODES = ("auto", "always", "never")
"""Evaluation's use of the shared prompt's KV cache; the rule is in `tasks.prefix_cache`."""


def scorer_for(model: nn.Module) -> Scorer:
    return next(scorer for scorer in SCORERS if scorer.applies_to(model))


def model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)  # transformers models know theirs
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) and inference mode; every module's mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()  # evaluation must be a function of the weights
    try:
        with torch.inference_mode():
            yield
    finally:
        # Per module, not model.train(mode): a model partly in eval mode stays that way.
        for module, training in modes:
            module.training = training
