"""Scoring through a shared prompt's KV cache equals the per-sequence layout (and one pair
per forward with full logits), reads the same token ids, runs each prompt once, and is
used only where the model and the rows allow it."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import tasks
import tasks.prefix_cache as prefix_cache
from tasks.base import Example, TaskError
from tasks.evaluation import EvalSettings, calibrated_scores, candidate_scores, evaluate
from tasks.kv_cache import CACHE_KEYWORDS, cache_keyword, returned_cache
from tasks.prefix_cache import encode_prefix_rows, prefix_pays, rows_of_cache, use_prefix_cache
from tasks.scoring import (
    ScoringRow,
    accepts_prefix_cache,
    bos_prefix,
    encode_rows,
    rows_of,
    score_rows,
    why_no_prefix_cache,
)
from tests.test_evaluation import TemplateTask
from tests.tiny import lively
from zo.models import masked_byte_tokenizer, tiny_model

# COPA-like (a sentence per candidate) and ReCoRD-like (several filled-in queries of
# different lengths) rows, with one-token candidates mixed in, prompts of different lengths.
ROWS = [
    ScoringRow(
        "The man broke his toe because",
        [" he dropped a hammer on his foot", " he got a hole in his sock"],
        0,
        "copa-1",
    ),
    ScoringRow("It rained so", [" the ground got wet", "!"], 0, "copa-2"),
    ScoringRow(
        "A storm hit the coast.\n- Thousands lost power\n- Schools closed\n",
        [" Officials in Ohio said", " Officials in New Jersey said", " Officials in X said"],
        1,
        "record-1",
    ),
    ScoringRow("Hi", ["a", "b"], 1, "one-token"),  # byte tokens: nothing to continue
]


# fp32: the two ways differ only in summation order (padding, cache); sums of a few
# dozen log-probs (calibration, normalize=False) reach ~1e2, hence the relative part.
TIGHT = {"atol": 1e-5, "rtol": 1e-6}


@pytest.fixture(scope="module", params=["llama", "opt", "qwen2"])
def causal(request):
    return lively(request.param)


def scores_both_ways(model, tokenizer, rows, batch_size=8, max_length=256, normalize=True):
    with torch.inference_mode():
        cached = score_rows(model, tokenizer, rows, batch_size, max_length, normalize, "always")
        plain = score_rows(model, tokenizer, rows, batch_size, max_length, normalize, "never")
    return cached, plain


def reference_scores(model, tokenizer, row: ScoringRow) -> torch.Tensor:
    """Mean candidate token log-prob, one pair per forward, full logits."""
    context = bos_prefix(tokenizer) + tokenizer(row.prompt, add_special_tokens=False)["input_ids"]
    scores = []
    for candidate in row.candidates:
        answer = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([context + answer])).logits[0].float().log_softmax(-1)
        scores.append(torch.stack([logp[len(context) - 1 + j, t] for j, t in enumerate(answer)]))
    return torch.stack([s.mean() for s in scores])


@pytest.mark.parametrize("normalize", [True, False])
def test_cached_scores_equal_uncached_and_one_pair_per_forward(causal, normalize):
    model, tokenizer = causal
    cached, plain = scores_both_ways(model, tokenizer, ROWS, normalize=normalize)
    for row, a, b in zip(ROWS, cached, plain, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
        assert int(a.argmax()) == int(b.argmax())
        if normalize:
            torch.testing.assert_close(
                a, reference_scores(model, tokenizer, row), atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("name", ["copa", "record"])
def test_suite_tasks_cached_equal_uncached_with_cut_prompts(causal, name):
    """The fixture rows of COPA and ReCoRD, in one batch and in several; max_length cuts
    ReCoRD's passages from the left, identically on both ways."""
    model, tokenizer = causal
    task = tasks.get_task(name, fixtures=True)
    rows = rows_of(task, task.load("dev") + task.load("train"))
    for batch_size, max_length in [(16, 256), (3, 96)]:
        cached, plain = scores_both_ways(model, tokenizer, rows, batch_size, max_length)
        for a, b in zip(cached, plain, strict=True):
            torch.testing.assert_close(a, b, **TIGHT)
        assert [int(s.argmax()) for s in cached] == [int(s.argmax()) for s in plain]


@pytest.mark.parametrize("max_length", [256, 40])
def test_the_same_token_ids_after_the_same_contexts(max_length):
    """Pair by pair: the scored ids, and the context each first token is predicted from,
    are those of the per-sequence layout."""
    _, tokenizer = tiny_model("llama")
    plain = encode_rows(tokenizer, ROWS, max_length)
    cached = encode_prefix_rows(tokenizer, ROWS, max_length)
    assert cached.candidate_lengths.tolist() == plain.candidate_lengths.tolist()
    assert cached.example_index.tolist() == plain.example_index.tolist()
    assert cached.candidate_index.tolist() == plain.candidate_index.tolist()
    for p in range(plain.num_pairs):
        assert (
            cached.target_ids[cached.target_pair == p].tolist()
            == plain.target_ids[plain.target_pair == p].tolist()
        )
        first_slot = int(plain.target_slot[plain.target_pair == p][0])
        sequence = int(plain.score_rows[first_slot])
        last = int(plain.score_positions[first_slot])
        row = int(plain.example_index[p])
        context = cached.prompt_ids[row][cached.prompt_mask[row].bool()]
        assert context.tolist() == plain.input_ids[sequence, : last + 1].tolist()


def test_each_prompt_runs_once(causal):
    """Rows through the embedding: one per example, then one per multi-token candidate
    holding only its own tokens (but its last)."""
    model, tokenizer = causal
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(tuple(args[0].shape))
    )
    try:
        with torch.inference_mode():
            score_rows(model, tokenizer, ROWS, 8, 256, True, "always")
    finally:
        hook.remove()

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    longer = [len(ids(c)) - 1 for row in ROWS for c in row.candidates if len(ids(c)) > 1]
    contexts = [len(bos_prefix(tokenizer) + ids(row.prompt)) for row in ROWS]
    assert seen == [(len(ROWS), max(contexts)), (len(longer), max(longer))]


def test_auto_takes_the_cache_only_where_prompts_repeat(causal, monkeypatch):
    model, tokenizer = causal
    calls = []
    original = prefix_cache.prefix_candidate_log_likelihoods

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(prefix_cache, "prefix_candidate_log_likelihoods", spy)
    verbalized = [ScoringRow(f"Review {i}: fine. It was", ["-", "+"], 0, f"r{i}") for i in range(3)]
    assert not prefix_pays(encode_prefix_rows(tokenizer, verbalized))  # one-token candidates
    assert prefix_pays(encode_prefix_rows(tokenizer, ROWS[2:3]))  # a sentence per candidate
    with torch.inference_mode():
        score_rows(model, tokenizer, verbalized, prefix_cache="auto")
        assert calls == []
        score_rows(model, tokenizer, ROWS[2:3], prefix_cache="auto")
        assert calls == [1]
        score_rows(model, tokenizer, ROWS[2:3], prefix_cache="never")
        assert calls == [1]


@pytest.mark.parametrize("max_length", [256, 40])
def test_slot_counts_are_those_of_the_padded_batches(max_length):
    _, tokenizer = tiny_model("llama")
    for rows in (ROWS, ROWS[3:], ROWS[1:2]):
        cached = encode_prefix_rows(tokenizer, rows, max_length)
        plain = encode_rows(tokenizer, rows, max_length)
        assert cached.per_sequence_slots == plain.input_ids.numel()
        width = cached.continuation_ids.shape[1]
        assert (
            cached.token_slots
            == cached.prompt_ids.numel() + cached.continuation_row.numel() * width
        )


def test_partial_scoring_rows_keep_the_per_sequence_layout(causal, monkeypatch):
    """A prompt per candidate (WinoGrande) has no shared prefix: that batch falls back."""
    model, tokenizer = causal
    partial = ScoringRow(
        "", [" was too heavy to lift.", " was too heavy to lift."], 1, "w", ["Rosa", "The box"]
    )
    with pytest.raises(TaskError, match="prompt of its own"):
        encode_prefix_rows(tokenizer, [partial])
    cached, plain = scores_both_ways(model, tokenizer, [partial, *ROWS], batch_size=2)
    for a, b in zip(cached, plain, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


def test_masked_lm_never_takes_the_cache(monkeypatch):
    """ "auto" scores a masked LM in its one-pass layout; "always" is an error naming it."""
    model, _ = tiny_model("roberta", seed=2)
    tokenizer = masked_byte_tokenizer()
    monkeypatch.setattr(
        prefix_cache, "encode_prefix_rows", lambda *a, **k: pytest.fail("prefix cache used")
    )
    rows = [ScoringRow("Fine film. It was", ["a", "b", "c"], 1, "m")]
    with torch.inference_mode():
        auto = score_rows(model, tokenizer, rows, prefix_cache="auto")
        plain = score_rows(model, tokenizer, rows, prefix_cache="never")
        with pytest.raises(TaskError, match=r"'always': RobertaForMaskedLM cannot .* masked LM"):
            score_rows(model, tokenizer, rows, prefix_cache="always")
    torch.testing.assert_close(auto[0], plain[0], atol=0, rtol=0)


class _NoCacheBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask=None):
        return (self.embed(input_ids),)


class _NoCacheLM(nn.Module):
    """A causal LM whose backbone cannot continue from a cache."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _NoCacheBackbone()
        self.lm_head = nn.Linear(4, 10)

    @property
    def base_model(self) -> nn.Module:
        return self.model

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def test_capability_is_read_from_the_backbone(causal):
    model, _ = causal
    backbone = model.base_model
    assert accepts_prefix_cache(model) and why_no_prefix_cache(model) is None
    assert cache_keyword(backbone) in CACHE_KEYWORDS
    assert not accepts_prefix_cache(_NoCacheLM())
    assert why_no_prefix_cache(_NoCacheLM()) == (
        "_NoCacheBackbone.forward takes no `cache` or `past_key_values`, position_ids, "
        "use_cache argument, so it cannot continue from a KV cache"
    )


class _NewNameBackbone(nn.Module):
    def forward(self, input_ids, position_ids=None, cache=None, use_cache=None, **kwargs): ...


class _OldNameBackbone(nn.Module):
    def forward(self, input_ids, position_ids=None, past_key_values=None, use_cache=None): ...


def test_the_cache_keyword_is_the_one_the_backbone_declares():
    """transformers >= 5.24 names it `cache`, earlier releases `past_key_values`; a
    backbone declaring the new name gets it, even where `**kwargs` would swallow either."""
    assert cache_keyword(_NewNameBackbone()) == "cache"
    assert cache_keyword(_OldNameBackbone()) == "past_key_values"
    assert cache_keyword(_NoCacheBackbone()) is None


def test_a_returned_cache_must_be_a_transformers_cache(causal):
    model, _ = causal
    backbone = model.base_model
    with torch.inference_mode():
        output = backbone(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
        assert returned_cache(backbone, output).get_seq_length() == 3
        without = backbone(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)
    for bad in (without, output.to_tuple()):
        with pytest.raises(TaskError, match=f"{type(backbone).__name__} returned .* Cache"):
            returned_cache(backbone, bad)


def test_always_is_an_error_naming_the_model_that_cannot(causal):
    _, tokenizer = causal
    with pytest.raises(
        TaskError,
        match=r"prefix_cache='always': _NoCacheLM cannot .*_NoCacheBackbone.forward takes no "
        r"`cache` or `past_key_values`",
    ):
        score_rows(_NoCacheLM(), tokenizer, ROWS, prefix_cache="always")


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    """The once-per-process log of `tasks.prefix_cache`, emptied for one test."""
    monkeypatch.setattr(prefix_cache, "_logged", set())
    caplog.set_level(logging.INFO, logger="tasks.prefix_cache")
    return caplog


def test_auto_logs_the_path_once_per_model_class(causal, fresh_log):
    model, tokenizer = causal
    name = type(model).__name__
    with torch.inference_mode():
        for _ in range(2):
            score_rows(model, tokenizer, ROWS, batch_size=2, prefix_cache="auto")
    assert [(r.levelno, r.getMessage()) for r in fresh_log.records] == [
        (
            logging.INFO,
            f"prefix_cache='auto': {name} runs each shared prompt once and scores the "
            "candidates after its KV cache where that pays (tasks.prefix_cache)",
        )
    ]
    fresh_log.clear()
    for _ in range(3):
        assert not use_prefix_cache(_NoCacheLM(), "auto")
    assert [(r.levelno, r.getMessage()) for r in fresh_log.records] == [
        (
            logging.WARNING,
            "prefix_cache='auto': _NoCacheLM scores every batch in one pass: "
            + why_no_prefix_cache(_NoCacheLM()),
        )
    ]


def test_auto_logs_a_masked_lm_once_and_quietly(fresh_log):
    model, _ = tiny_model("roberta", seed=2)
    tokenizer = masked_byte_tokenizer()
    rows = [ScoringRow("Fine film. It was", ["a", "b", "c"], 1, "m")]
    with torch.inference_mode():
        for _ in range(2):
            score_rows(model, tokenizer, rows, prefix_cache="auto")
    assert [(r.levelno, r.getMessage()) for r in fresh_log.records] == [
        (
            logging.INFO,
            "prefix_cache='auto': RobertaForMaskedLM scores every batch in one pass: a "
            "masked LM reads each prompt with its candidates in one pass",
        )
    ]


def test_a_backbone_that_ignores_the_cache_is_an_error(causal, monkeypatch):
    """A cache under a name the forward takes into `**kwargs` (as `cache=` before
    transformers 5.24) would score the candidates without their prompt: refused."""
    model, tokenizer = causal
    monkeypatch.setattr(prefix_cache, "cache_keyword", lambda backbone: "unread_cache")
    with (
        torch.inference_mode(),
        pytest.raises(TaskError, match="ignored the KV cache passed as `unread_cache`"),
    ):
        score_rows(model, tokenizer, ROWS, prefix_cache="always")


def test_evaluation_entry_points_agree_across_modes(causal):
    model, tokenizer = causal
    task = TemplateTask(kind="multiple_choice")
    examples = [
        Example({"text": "Tea", "options": [" hot and fresh", " cold and sweet"]}, 1, "a"),
        Example({"text": "The longest text", "options": [" here it is", ".", " now!"]}, 0, "b"),
    ]
    results = {
        mode: evaluate(model, tokenizer, task, examples, prefix_cache=mode)
        for mode in ("auto", "never")
    }
    assert results["auto"] == results["never"]
    with torch.inference_mode():
        scores = {
            mode: candidate_scores(
                model, tokenizer, task, examples, EvalSettings(prefix_cache=mode)
            )
            for mode in ("always", "never")
        }
        calibrated = {
            mode: calibrated_scores(
                model, tokenizer, task, examples, EvalSettings(calibrate=True, prefix_cache=mode)
            )
            for mode in ("always", "never")
        }
    for kind in (scores, calibrated):
        for a, b in zip(kind["always"], kind["never"], strict=True):
            torch.testing.assert_close(a, b, **TIGHT)


def test_an_unknown_mode_is_an_error_naming_the_choices():
    with pytest.raises(TaskError, match=r"prefix_cache 'yes' is not one of \['auto'"):
        EvalSettings(prefix_cache="yes")
    model, tokenizer = tiny_model("llama")
    with pytest.raises(TaskError, match="prefix_cache"):
        score_rows(model, tokenizer, ROWS, prefix_cache="on")


def test_sliding_window_layers_read_the_same_window():
    """Mistral with a window shorter than the prompts: left padding keeps distances, and
    the sliding layers' view attends what their own update would return."""
    model, tokenizer = lively("mistral")
    model.config.sliding_window = 6  # read when the forward builds its cache and masks
    cached, plain = scores_both_ways(model, tokenizer, ROWS)
    model.config.sliding_window = None
    _, unwindowed = scores_both_ways(model, tokenizer, ROWS)
    for a, b in zip(cached, plain, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    assert any(not torch.allclose(b, c) for b, c in zip(plain, unwindowed, strict=True))


def test_other_cache_layers_are_copied_per_candidate(causal, monkeypatch):
    """The fallback for layer kinds without a view: `batch_select_indices`, same scores."""
    model, tokenizer = causal
    viewed, plain = scores_both_ways(model, tokenizer, ROWS)
    monkeypatch.setattr(prefix_cache, "_VIEWABLE_LAYERS", ())
    copied, _ = scores_both_ways(model, tokenizer, ROWS)
    for a, b, c in zip(viewed, copied, plain, strict=True):
        torch.testing.assert_close(a, c, **TIGHT)
        torch.testing.assert_close(b, c, **TIGHT)


def test_the_cache_view_selects_rows_and_stores_nothing(causal):
    model, _ = causal
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    with torch.inference_mode():
        prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
        cache = returned_cache(backbone, backbone(input_ids=prompt, use_cache=True))
        rows = torch.tensor([1, 1, 0])
        view = rows_of_cache(cache, rows)
        source = cache.layers[0]
        keys_before = source.keys
        new = torch.randn(3, source.keys.shape[1], 2, source.keys.shape[3])
        keys, values = view.update(new, -new, 0)
    torch.testing.assert_close(keys, torch.cat([keys_before[rows], new], dim=-2), atol=0, rtol=0)
    torch.testing.assert_close(values[:, :, -2:], -new, atol=0, rtol=0)
    assert view.layers[0].keys is keys_before and cache.layers[0].keys is keys_before
    assert view.get_seq_length() == cache.get_seq_length() == 3
