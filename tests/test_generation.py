"""Greedy decoding: left-padded batches with the KV cache equal one prompt at a time with
full forwards and no cache, token for token; stop strings, EOS and truncation."""

from __future__ import annotations

import pytest
import torch

import tasks.generation as generation_module
from tasks.base import TaskError
from tasks.generation import GreedyConfig, greedy_generate, left_padded_prompts
from tests.test_prefix_cache import _NoCacheLM
from tests.tiny import lively

PROMPTS = ["Hello there, how", "Q: capital of France?\nA:", "x", "A somewhat longer prompt, to pad"]


@pytest.fixture(scope="module", params=["llama", "opt"])
def tiny(request):
    return lively(request.param)


def naive_greedy(model, tokenizer, prompt: str, steps: int) -> list[int]:
    """The reference: no padding, no cache, full logits, argmax of the last position."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
    return out


def test_left_padding_layout(tiny):
    _, tokenizer = tiny
    ids, mask = left_padded_prompts(tokenizer, ["abc", "a"], room=8)
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids[1, :2].tolist() == [tokenizer.pad_token_id] * 2
    assert tokenizer.decode(ids[1, 2:]) == "a"


def test_batched_greedy_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    config = GreedyConfig(max_new_tokens=10, stop=())
    batched = greedy_generate(model, tokenizer, PROMPTS, config)
    for prompt, generation in zip(PROMPTS, batched, strict=True):
        reference = naive_greedy(model, tokenizer, prompt, 10)
        assert generation.token_ids == reference, prompt
        assert greedy_generate(model, tokenizer, [prompt], config)[0].token_ids == reference
        assert len(set(reference)) > 2  # a real sequence, not one token repeated


def test_head_sees_one_position_per_row_and_step(tiny):
    model, tokenizer = tiny
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        greedy_generate(model, tokenizer, PROMPTS[:3], GreedyConfig(max_new_tokens=4, stop=()))
    finally:
        handle.remove()
    assert seen == [(3, model.config.vocab_size)] * 4


def test_stop_string_ends_a_row_and_cuts_its_text(tiny):
    model, tokenizer = tiny
    full = naive_greedy(model, tokenizer, PROMPTS[0], 12)
    # The first ASCII letter or digit the model produces after its first token: the row
    # must stop on the token that holds it, and its text end just before it.
    k, char = next(
        (j, c)
        for j in range(1, len(full))
        if (c := tokenizer.decode(full[j : j + 1])).isascii()
        and c.isalnum()
        and c not in tokenizer.decode(full[:j])
    )
    generation, other = greedy_generate(
        model, tokenizer, [PROMPTS[0], PROMPTS[3]], GreedyConfig(max_new_tokens=12, stop=(char,))
    )
    assert generation.token_ids == full[: k + 1]
    assert generation.text == tokenizer.decode(full[:k])
    assert other.token_ids == naive_greedy(model, tokenizer, PROMPTS[3], len(other.token_ids))


def test_eos_ends_a_row(tiny):
    model, tokenizer = tiny
    full = naive_greedy(model, tokenizer, PROMPTS[1], 12)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = full[3]
    try:
        (generation,) = greedy_generate(model, tokenizer, [PROMPTS[1]], GreedyConfig(12, stop=()))
    finally:
        model.generation_config.eos_token_id = saved
    assert generation.token_ids == full[: full.index(full[3]) + 1]


def test_long_prompts_keep_their_last_tokens(tiny):
    model, tokenizer = tiny
    config = GreedyConfig(max_new_tokens=5, max_length=17, stop=())
    (generation,) = greedy_generate(model, tokenizer, [PROMPTS[3]], config)
    assert generation.token_ids == naive_greedy(model, tokenizer, PROMPTS[3][-12:], 5)


def test_bad_settings_are_errors(tiny):
    model, tokenizer = tiny
    with pytest.raises(TaskError, match="max_new_tokens must be >= 1"):
        GreedyConfig(max_new_tokens=0)
    with pytest.raises(TaskError, match="no room for a prompt"):
        greedy_generate(model, tokenizer, ["a"], GreedyConfig(max_new_tokens=8, max_length=8))
    with pytest.raises(TaskError, match="empty"):
        greedy_generate(model, tokenizer, [""], GreedyConfig(max_new_tokens=2))


def test_a_backbone_without_a_kv_cache_is_an_error_naming_it(tiny):
    _, tokenizer = tiny
    with pytest.raises(TaskError, match="_NoCacheBackbone.forward takes no `cache` or"):
        greedy_generate(_NoCacheLM(), tokenizer, ["a"], GreedyConfig(max_new_tokens=2))


def test_a_cache_the_backbone_does_not_read_is_an_error(tiny, monkeypatch):
    """A cache under a name the forward takes into `**kwargs` (as `cache=` before
    transformers 5.24): each step would see only its new token. Refused at the second step."""
    model, tokenizer = tiny
    monkeypatch.setattr(generation_module, "cache_keyword", lambda backbone: "unread_cache")
    with torch.no_grad(), pytest.raises(TaskError, match="did not continue the cache passed"):
        greedy_generate(model, tokenizer, PROMPTS, GreedyConfig(max_new_tokens=3, stop=()))
