"""Candidate scoring against full-logits references: batched = one pair per forward, the
loss of each task kind reads exactly the tokens it should, and masked-LM scoring at <mask>."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import pytest
import torch

from tasks.base import Example, MaskedPrompt, Task, TaskError
from tasks.encoding import (
    CandidateBatch,
    MaskedCandidateBatch,
    ScoringRow,
    encode_candidates,
    encode_masked_rows,
    encode_rows,
    rows_of,
)
from tasks.evaluation import EvalSettings, candidate_scores
from tasks.lm import backbone_and_head, is_masked_lm, scorer_for
from tasks.losses import batch_loss, candidate_log_likelihoods, classification_loss, make_batch
from zo.models import masked_byte_tokenizer, tiny_model


@dataclass
class ListTask(Task):
    """Prompt = fields["text"]; candidates = fields["options"] (or the fixed `words`)."""

    name: str = "list"
    kind: str = "classification"
    words: tuple[str, ...] = (" bad", " good")

    def load(self, split: str) -> list[Example]:
        raise NotImplementedError

    def prompt(self, example: Example) -> str:
        return example.fields["text"]

    def candidates(self, example: Example) -> list[str]:
        return list(example.fields.get("options", self.words))


@dataclass
class AnswerTask(ListTask):
    name: str = "answers"
    kind: str = "generation"
    metric: str = "squad_f1"


CLASSIFICATION = [
    Example({"text": f"Review {i}: {'so ' * i}it was"}, label=i % 2, uid=f"c{i}") for i in range(7)
]
MULTIPLE_CHOICE = [
    Example({"text": "Tea or", "options": [" coffee", " milk"]}, label=1, uid="a"),
    Example({"text": "The longest prompt of this batch ends", "options": [" here", "."]}, 0, "b"),
    Example({"text": "Hi", "options": ["?", " there, friend", "!"]}, label=1, uid="c"),
    Example({"text": "Yes or no", "options": ["y", "n", " maybe so"]}, label=2, uid="d"),
]
GENERATION = [
    Example({"text": "Q: capital of France?\nA:"}, 0, "g0", answers=("Paris", "paris")),
    Example({"text": "Q: two plus two?\nA:"}, 0, "g1", answers=("four",)),
]


@pytest.fixture(scope="module", params=["llama", "opt"])
def causal(request):
    return tiny_model(request.param, seed=1)


@pytest.fixture(scope="module")
def roberta():
    model, _ = tiny_model("roberta", seed=2)
    return model, masked_byte_tokenizer()


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def pair_token_scores(model, tokenizer, prompt: str, candidate: str) -> torch.Tensor:
    """One (prompt, candidate) pair per forward, full logits: the anchors' way."""
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(candidate, add_special_tokens=False)["input_ids"]
    logp = full_logits(model, context + answer)
    return torch.stack([logp[len(context) - 1 + j, t] for j, t in enumerate(answer)])


# ------------------------------------------------------------------- causal, batched


@pytest.mark.parametrize("kind", ["classification", "multiple_choice"])
def test_batched_scores_equal_one_pair_per_forward(causal, kind):
    model, tokenizer = causal
    task = ListTask(kind=kind)
    examples = CLASSIFICATION if kind == "classification" else MULTIPLE_CHOICE
    settings = EvalSettings(batch_size=3, max_length=128)
    with torch.no_grad():
        batched = candidate_scores(model, tokenizer, task, examples, settings)
    for example, scores in zip(examples, batched, strict=True):
        reference = torch.stack(
            [
                pair_token_scores(model, tokenizer, task.prompt(example), c).mean()
                for c in task.candidates(example)
            ]
        )
        torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
        assert int(scores.argmax()) == int(reference.argmax())


def test_lm_head_sees_only_scored_positions(causal):
    """No [sequences, length, vocab] logits: the head gets one row per scored position, and
    the full model forward (which computes logits everywhere) is never called."""
    model, tokenizer = causal
    task = ListTask(kind="multiple_choice")
    head = model.get_output_embeddings()
    seen = []
    hooks = [
        head.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape))),
        model.register_forward_pre_hook(lambda m, args: pytest.fail("full forward called")),
    ]
    try:
        with torch.no_grad():
            candidate_scores(model, tokenizer, task, MULTIPLE_CHOICE, EvalSettings(batch_size=4))
    finally:
        for hook in hooks:
            hook.remove()
    # A candidate of n > 1 tokens is scored at n positions of its own sequence; a
    # one-token candidate at the prompt's last position, which that sequence already
    # scores (or, with no longer candidate in the example, one context-only sequence).
    lengths = [
        [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in e.fields["options"]]
        for e in MULTIPLE_CHOICE
    ]
    expected = sum(sum(n for n in row if n > 1) or 1 for row in lengths)
    assert seen == [(expected, model.config.vocab_size)]


def test_one_token_candidates_share_one_sequence(causal):
    """Candidates of one token each cost one sequence per example, scored at one position."""
    model, tokenizer = causal
    task = ListTask(words=("+", "-", "?"))
    batch = encode_candidates(tokenizer, task, CLASSIFICATION[:3])
    assert batch.num_sequences == 3 and batch.score_positions.numel() == 3
    with torch.no_grad():
        scores = candidate_log_likelihoods(model, batch)
    for b, example in enumerate(CLASSIFICATION[:3]):
        reference = torch.stack(
            [pair_token_scores(model, tokenizer, example.fields["text"], w)[0] for w in task.words]
        )
        torch.testing.assert_close(scores[b], reference, atol=1e-5, rtol=0)


def test_classification_loss_reads_every_candidate(causal):
    model, tokenizer = causal
    task = ListTask()
    batch = make_batch(tokenizer, task, CLASSIFICATION[:4], model=model)
    assert batch.kind == "classification" and batch.num_examples == 4
    assert batch.pairs.num_pairs == 8
    with torch.no_grad():
        loss = batch_loss(model, batch)
        expected = classification_loss(
            model, encode_candidates(tokenizer, task, CLASSIFICATION[:4])
        )
    assert loss.dim() == 0 and loss.item() == expected.item()


@pytest.mark.parametrize("kind", ["multiple_choice", "generation"])
def test_teacher_forcing_scores_only_gold_tokens(causal, kind):
    model, tokenizer = causal
    task = ListTask(kind="multiple_choice") if kind == "multiple_choice" else AnswerTask()
    examples = MULTIPLE_CHOICE if kind == "multiple_choice" else GENERATION
    batch = make_batch(tokenizer, task, examples, model=model)
    golds = [
        task.candidates(e)[e.label] if kind == "multiple_choice" else " " + e.answers[0]
        for e in examples
    ]
    # Hand check: the scored tokens are the gold continuations' tokens, nothing else.
    expected_ids = [t for g in golds for t in tokenizer(g, add_special_tokens=False)["input_ids"]]
    assert batch.pairs.target_ids.tolist() == expected_ids
    assert batch.pairs.num_pairs == len(examples)
    with torch.no_grad():
        loss = batch_loss(model, batch)
    # label -100 semantics: mean NLL over all gold tokens pooled over the batch.
    tokens = torch.cat(
        [
            pair_token_scores(model, tokenizer, task.prompt(e), g)
            for e, g in zip(examples, golds, strict=True)
        ]
    )
    assert loss.item() == pytest.approx(-tokens.mean().item(), abs=1e-5)


def test_teacher_forcing_has_a_gradient(causal):
    model, tokenizer = causal
    batch = make_batch(tokenizer, AnswerTask(), GENERATION, model=model)
    model.zero_grad(set_to_none=True)
    batch_loss(model, batch).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_generation_without_answers_is_an_error(causal):
    model, tokenizer = causal
    with pytest.raises(TaskError, match="has no answer"):
        make_batch(tokenizer, AnswerTask(), [Example({"text": "Q?"}, 0, "x")], model=model)


def test_unknown_kind_is_an_error(causal):
    model, tokenizer = causal
    with pytest.raises(TaskError, match="kind 'ranking' is not one of"):
        make_batch(tokenizer, ListTask(kind="ranking"), CLASSIFICATION, model=model)


# ---------------------------------------------------------------------- masked LMs


def test_scorer_dispatches_on_model_type(causal, roberta):
    assert is_masked_lm(roberta[0]) and not is_masked_lm(causal[0])
    assert scorer_for(roberta[0]).layout is MaskedCandidateBatch
    assert scorer_for(causal[0]).layout is CandidateBatch
    _, head = backbone_and_head(roberta[0])
    assert head is roberta[0].lm_head  # dense + layer norm + decoder, not the decoder alone


@pytest.mark.parametrize(
    ("prompt", "expected_ids"),
    [
        ("It was", "<s>It was<mask></s>"),  # mask appended
        ("It was<mask> fun.", "<s>It was<mask> fun.</s>"),  # the template's own mask slot
    ],
)
def test_masked_lm_scores_are_log_softmax_at_the_mask(roberta, prompt, expected_ids):
    model, tokenizer = roberta
    task = ListTask(words=("+", "-", "?"))
    examples = [
        Example({"text": prompt}, 1, "m"),
        Example({"text": "Longer text. " + prompt}, 0, "n"),
    ]
    batch = make_batch(tokenizer, task, examples, model=model)
    assert isinstance(batch.pairs, MaskedCandidateBatch)
    assert tokenizer.decode(batch.pairs.input_ids[0][batch.pairs.attention_mask[0] == 1]) == (
        expected_ids
    )
    with torch.no_grad():
        scores = candidate_log_likelihoods(model, batch.pairs)
        loss = batch_loss(model, batch)
    references = []
    for b, example in enumerate(examples):
        ids = tokenizer(task.prompt(example) + ("" if "<mask>" in prompt else "<mask>"))[
            "input_ids"
        ]
        logp = full_logits(model, ids)[ids.index(tokenizer.mask_token_id)]
        words = [tokenizer.convert_tokens_to_ids(w) for w in task.words]
        references.append(logp[words])
        torch.testing.assert_close(scores[b], logp[words], atol=1e-5, rtol=0)
    expected = (
        -sum(r.log_softmax(0)[e.label] for r, e in zip(references, examples, strict=True)) / 2
    )
    assert loss.item() == pytest.approx(float(expected), abs=1e-5)


@dataclass
class FormTask(ListTask):
    """A ListTask with a masked-LM form of its own: the mask inside, other words."""

    form_words: tuple[str, ...] = ("+", "-")

    def masked_form(self, example: Example) -> MaskedPrompt:
        return MaskedPrompt(f"<mask> is what {example.fields['text']} was.", self.form_words)


def test_a_tasks_masked_form_is_read_by_masked_lms_only(roberta, causal):
    task, examples = FormTask(), CLASSIFICATION[:2]
    model, tokenizer = roberta
    batch = make_batch(tokenizer, task, examples, model=model).pairs
    assert tokenizer.decode(batch.input_ids[0][batch.attention_mask[0] == 1]) == (
        f"<s><mask> is what {examples[0].fields['text']} was.</s>"
    )
    words = [tokenizer.convert_tokens_to_ids(w) for w in task.form_words]
    with torch.no_grad():
        scores = candidate_log_likelihoods(model, batch)
    for b, example in enumerate(examples):
        ids = tokenizer(task.masked_form(example).prompt)["input_ids"]
        reference = full_logits(model, ids)[ids.index(tokenizer.mask_token_id)][words]
        torch.testing.assert_close(scores[b], reference, atol=1e-5, rtol=0)
    # a causal LM reads the prompt and candidates, exactly as without the form
    model, tokenizer = causal
    with_form = make_batch(tokenizer, task, examples, model=model).pairs
    without = make_batch(tokenizer, ListTask(), examples, model=model).pairs
    assert all(getattr(with_form, f.name).equal(getattr(without, f.name)) for f in fields(without))
    # a form that reads another number of words than the task has candidates is refused
    with pytest.raises(TaskError, match="2 candidates but its masked-LM form reads 3 words"):
        rows_of(FormTask(form_words=("+", "-", "?")), examples)


def test_masked_lm_truncates_the_prompt_from_the_left(roberta):
    model, tokenizer = roberta
    row = ScoringRow("a b c d e f g h", ["+", "-"], 0, "t")
    batch = encode_masked_rows(tokenizer, [row], max_length=8)
    assert tokenizer.decode(batch.input_ids[0]) == "<s>f g h<mask></s>"  # 8 = 2 + 6


def test_head_sees_only_mask_positions(roberta):
    model, tokenizer = roberta
    task = ListTask(words=("+", "-"))
    batch = make_batch(tokenizer, task, CLASSIFICATION[:3], model=model)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            batch_loss(model, batch)
    finally:
        handle.remove()
    assert seen == [(3, model.config.vocab_size)]


def test_masked_lm_rejects_multi_token_candidates(roberta):
    model, tokenizer = roberta
    with pytest.raises(TaskError, match="' bad' is 4 tokens.*single token"):
        make_batch(tokenizer, ListTask(), CLASSIFICATION[:1], model=model)


def test_masked_lm_needs_a_mask_token(roberta, causal):
    with pytest.raises(TaskError, match="mask token"):
        encode_masked_rows(causal[1], [ScoringRow("x", ["+", "-"], 0, "u")])


def test_a_batch_in_the_wrong_layout_is_refused(roberta, causal):
    model, tokenizer = roberta
    causal_batch = encode_rows(tokenizer, [ScoringRow("It was", ["+", "-"], 0, "w")])
    with pytest.raises(TaskError, match="needs MaskedCandidateBatch"):
        classification_loss(model, causal_batch)
    masked_batch = encode_masked_rows(tokenizer, [ScoringRow("It was", ["+", "-"], 0, "w")])
    with pytest.raises(TaskError, match="needs CandidateBatch"):
        classification_loss(causal[0], masked_batch)


def test_masked_lm_cannot_train_a_generation_task(roberta):
    model, tokenizer = roberta
    with pytest.raises(TaskError, match="masked LM .* cannot decode"):
        make_batch(tokenizer, AnswerTask(), GENERATION, model=model)


# ----------------------------------------------- a prompt per candidate (partial scoring)

PARTIAL_ROWS = [
    # the options differ in the prompt, the scored continuation is shared
    ScoringRow("Ann met Bo", [" Ann", " Bo"], 1, "plain"),
    ScoringRow("So", [" was late.", " was late."], 0, "p0", prompts=["So Ann", "So Bo"]),
    ScoringRow("", [".", "."], 1, "p1", prompts=["Ann", "Bo left"]),  # one-token continuation
    ScoringRow("Hi", ["!", " there"], 0, "p2", prompts=["Hi", "Hi"]),  # one prompt after all
]


def test_each_candidate_is_scored_after_its_own_prompt(causal):
    model, tokenizer = causal
    batch = encode_rows(tokenizer, PARTIAL_ROWS)
    # Sequences: the plain row one per multi-token candidate (or one), p0 one per prompt,
    # p1 a context-only one per prompt, p2 one for both, like a row without prompts.
    lengths = {c: len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in (" Ann", " Bo")}
    plain = sum(1 for n in lengths.values() if n > 1) or 1
    assert batch.num_sequences == plain + 2 + 2 + 1
    with torch.no_grad():
        scores = candidate_log_likelihoods(model, batch, normalize=False)
    for b, row in enumerate(PARTIAL_ROWS):
        reference = torch.stack(
            [
                pair_token_scores(model, tokenizer, p, c).sum()
                for p, c in zip(row.candidate_prompts, row.candidates, strict=True)
            ]
        )
        torch.testing.assert_close(scores[b], reference, atol=1e-5, rtol=0)
    # Only the continuations' tokens are scored, never the prompts' (the options').
    expected = [
        t
        for row in PARTIAL_ROWS
        for c in row.candidates
        for t in tokenizer(c, add_special_tokens=False)["input_ids"]
    ]
    assert batch.target_ids.tolist() == expected


def test_equal_candidate_prompts_encode_like_one_prompt(causal):
    _, tokenizer = causal
    rows = [ScoringRow("Hi", ["!", " there", "?"], 1, "u"), ScoringRow("Tea or", ["+"], 0, "v")]
    shared = encode_rows(tokenizer, rows)
    own = encode_rows(tokenizer, [replace(r, prompts=r.candidate_prompts) for r in rows])
    for f in fields(CandidateBatch):
        assert torch.equal(getattr(shared, f.name), getattr(own, f.name)), f.name


def test_candidate_prompts_are_cut_from_the_left_to_one_room(causal):
    """A row's prompts lose tokens from the left to the same room, sized for its longest
    candidate, so each candidate keeps the end of its prompt (the option)."""
    _, tokenizer = causal
    row = ScoringRow("", [" was late.", " was late."], 0, "p", prompts=["So Ann", "So Bo"])
    answer = tokenizer(" was late.", add_special_tokens=False)["input_ids"]
    room = 3
    batch = encode_rows(tokenizer, [row], max_length=len(answer) + room)
    for s, prompt in enumerate(row.prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-room:]
        assert batch.input_ids[s][batch.attention_mask[s].bool()].tolist() == ids + answer[:-1]


def test_candidate_prompts_must_match_the_candidates():
    with pytest.raises(TaskError, match="1 candidate prompts for 2 candidates"):
        ScoringRow("x", ["a", "b"], 0, "u", prompts=["x a"])


def test_a_task_with_candidate_prompts_trains_after_the_gold_prompt(causal):
    """`candidate_prompts(example)` on a task: teacher forcing reads the gold candidate
    after the gold prompt; the prediction compares the candidates after their prompts."""
    model, tokenizer = causal

    @dataclass
    class Fill(ListTask):
        kind: str = "multiple_choice"

        def candidate_prompts(self, example: Example) -> list[str]:
            return [example.fields["text"] + o for o in example.fields["fills"]]

    task = Fill()
    examples = [
        Example({"text": "So", "fills": [" Ann", " Bo"], "options": [" ran.", " ran."]}, 1, "a"),
        Example({"text": "", "fills": ["Cy", "Di"], "options": [" sat down", " sat down"]}, 0, "b"),
    ]
    batch = make_batch(tokenizer, task, examples, model=model)
    gold = [task.candidate_prompts(e)[e.label] for e in examples]
    tokens = torch.cat(
        [
            pair_token_scores(model, tokenizer, p, task.candidates(e)[e.label])
            for p, e in zip(gold, examples, strict=True)
        ]
    )
    with torch.no_grad():
        loss = batch_loss(model, batch)
        scores = candidate_scores(model, tokenizer, task, examples, EvalSettings())
    assert loss.item() == pytest.approx(-tokens.mean().item(), abs=1e-5)
    for example, got in zip(examples, scores, strict=True):
        reference = [
            pair_token_scores(model, tokenizer, p, c).mean()
            for p, c in zip(task.candidate_prompts(example), task.candidates(example), strict=True)
        ]
        torch.testing.assert_close(got, torch.stack(reference), atol=1e-5, rtol=0)
    with pytest.raises(TaskError, match="partial scoring.*calibrate=False"):
        candidate_scores(model, tokenizer, task, examples, EvalSettings(calibrate=True))


def test_masked_lm_refuses_a_prompt_per_candidate(roberta):
    model, tokenizer = roberta
    row = ScoringRow("", [".", "."], 0, "p", prompts=["Ann", "Bo"])
    with pytest.raises(TaskError, match="prompt of its own.*use a causal LM"):
        encode_masked_rows(tokenizer, [row])
