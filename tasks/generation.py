"""Greedy decoding of a batch of prompts: left padding, a KV cache, logits for one position.

Prompts are left-padded, so every row's next token is predicted at the last column and
one token per row is appended per step. Position ids count real tokens only (the
cumulative sum of the attention mask), and pad columns are masked out of attention, so a
padded row computes what it would alone, up to floating-point summation order. Each
step feeds only the new tokens and reuses the keys and values of earlier ones (the
backbone's KV cache, under the keyword its transformers release names: `tasks.kv_cache`);
only the last hidden state of a row goes through the LM head, never [rows, length, vocab]
logits.

A row stops at an EOS token or once its text contains a stop string (a newline by
default, as MeZO stops SQuAD and DROP answers); the batch stops when every row has, or
after `max_new_tokens`. Finished rows still ride along in the batch (dropping them from
the cache would cost more bookkeeping than the few wasted columns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tasks.base import TaskError
from tasks.kv_cache import cache_keyword, returned_cache, why_no_kv_cache
from tasks.scoring import backbone_and_head, bos_prefix, head_logits, model_device, pad_id


@dataclass(frozen=True)
class GreedyConfig:
    """How far and until what to decode."""

    max_new_tokens: int = 50
    """The most tokens generated per prompt (MeZO's setting for SQuAD and DROP)."""
    max_length: int = 256
    """Prompt plus generated tokens; a longer prompt loses tokens from the left (after
    BOS), so that `max_new_tokens` always fit."""
    stop: tuple[str, ...] = ("\n",)
    """A row ends once its decoded text contains one of these; the text is cut before it."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise TaskError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Generation:
    """One prompt's greedy continuation."""

    token_ids: list[int]
    """Every generated token, the one that ended the row (EOS, stop string) included."""
    text: str
    """The decoded continuation without special tokens, cut before the first stop string."""


def left_padded_prompts(tokenizer: Any, prompts: Sequence[str], room: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), left-padded; each prompt keeps its last `room` tokens."""
    bos = bos_prefix(tokenizer)
    if room <= len(bos):
        raise TaskError(
            f"no room for a prompt: max_length - max_new_tokens = {room} tokens (BOS included)"
        )
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    sequences = [bos + ids[max(0, len(ids) - (room - len(bos))) :] for ids in encoded]
    for prompt, sequence in zip(prompts, sequences, strict=True):
        if not sequence:
            raise TaskError(f"prompt {prompt!r} is empty and the tokenizer adds no BOS")
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        input_ids[i, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[i, width - len(sequence) :] = 1
    return input_ids, attention_mask


def eos_ids(tokenizer: Any, model: nn.Module) -> set[int]:
    """The token ids that end a row: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if value is not None:
            ids.update(value if isinstance(value, list | tuple) else [value])
    return ids


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to its first stop string, and whether there was one."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def greedy_generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], config: GreedyConfig | None = None
) -> list[Generation]:
    """The greedy continuation of every prompt, all in one batch (see the module doc)."""
    config = config or GreedyConfig()
    if not prompts:
        return []
    backbone, head = backbone_and_head(model)
    reason = why_no_kv_cache(backbone)
    if reason is not None:
        raise TaskError(f"greedy decoding reuses a KV cache, but {reason}")
    keyword = cache_keyword(backbone)
    device = model_device(model)
    input_ids, mask = left_padded_prompts(
        tokenizer, prompts, config.max_length - config.max_new_tokens
    )
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    eos = eos_ids(tokenizer, model)
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    past = None
    for _ in range(config.max_new_tokens):
        output = backbone(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{keyword: past},
        )
        past = returned_cache(backbone, output)
        if past.get_seq_length() != mask.shape[1]:  # a cache taken into **kwargs, unread
            raise TaskError(
                f"{type(backbone).__name__} holds {past.get_seq_length()} positions in its KV "
                f"cache after reading {mask.shape[1]}: it did not continue the cache passed "
                f"as `{keyword}`"
            )
        next_ids = head_logits(model, head, output[0][:, -1]).argmax(dim=-1)
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            generated[row].append(token)
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            done[row] = token in eos or _cut(text, config.stop)[1]
        if all(done):
            break
        input_ids = next_ids[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
    return [
        Generation(ids, _cut(tokenizer.decode(ids, skip_special_tokens=True), config.stop)[0])
        for ids in generated
    ]
