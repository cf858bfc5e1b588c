"""Scoring candidates with a language model: log-likelihoods, the training losses, evaluation.

A "row" is a prompt and the candidate continuations scored after it, or (partial
scoring, WinoGrande) one prompt per candidate: a task with a `candidate_prompts(example)`
method gives each candidate its own prompt, so the options can differ in the prompt and
share the scored continuation. Two layouts turn rows into one padded batch, chosen by the
model (`scorer_for`), never by family name:

- Causal LMs read `prompt tokens + candidate tokens`; token t of a candidate is scored
  at position t - 1. A one-token candidate is predicted from the prompt alone, so it
  needs no sequence of its own and rides on a sequence of the same row: a row whose
  candidates are all one token (" terrible" / " great") costs one sequence, not one per
  candidate. Candidates with prompts of their own share sequences only with candidates
  of the same prompt.
- Masked LMs (RoBERTa, MeZO's medium-model protocol) read `prompt <mask>` (or the
  prompt's own `<mask>`) wrapped in the tokenizer's special tokens; every candidate
  must be one token, scored at the mask position. One sequence per row, so rows with a
  prompt per candidate are refused: partial scoring reads a multi-token continuation
  after each prompt, which a masked LM does not predict left to right. A row made from
  a task with a masked-LM form (`Task.masked_form`: LM-BFF's templates, the mask inside
  the sentence) carries it, and the masked layout reads that form instead; the causal
  layout never looks at it.

Either way only the hidden states at scored positions reach the LM head, so the logits
are [scored positions, vocab] instead of [sequences, length, vocab]: with a 50k-150k
vocabulary the full logits would be most of a forward's memory and time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.base import MASK, Example, MaskedPrompt, Task, TaskError, check_choice
from tasks.kv_cache import why_no_kv_cache


@dataclass(frozen=True)
class ScoringRow:
    """A prompt, the candidates scored after it, and the gold candidate's index.

    `prompts`, when given, holds one prompt per candidate and replaces `prompt` for
    scoring (partial scoring); `prompt` then only describes the row (the text the
    candidate prompts share) and orders rows into batches.
    """

    prompt: str
    candidates: Sequence[str]
    label: int
    uid: str
    prompts: Sequence[str] | None = None
    masked: MaskedPrompt | None = None
    """The row's masked-LM form (`Task.masked_form`), read by masked LMs instead."""
    masked_of: str | None = None
    """The prompt `masked` was made with (set from `prompt` when not given): a row whose
    prompt was replaced later (`dataclasses.replace`) no longer matches its masked form."""

    def __post_init__(self) -> None:
        if self.prompts is not None and len(self.prompts) != len(self.candidates):
            raise TaskError(
                f"example {self.uid!r}: {len(self.prompts)} candidate prompts for "
                f"{len(self.candidates)} candidates; give one prompt per candidate"
            )
        if self.masked is not None and self.masked_of is None:
            object.__setattr__(self, "masked_of", self.prompt)  # frozen: set once, here

    def for_masked_lm(self, mask_token: str = MASK) -> ScoringRow:
        """The row a masked LM reads: its masked form (MASK spelled `mask_token`) with the
        same label, or the row itself when it has none."""
        if self.masked is None:
            return self
        if self.masked_of != self.prompt or len(self.masked.candidates) != len(self.candidates):
            raise TaskError(
                f"example {self.uid!r}: the row was changed after its masked-LM form was made "
                "(a new prompt or candidate set), so the form no longer describes it; build "
                "the changed row from the task (tasks.scoring.rows_of) or drop `masked`"
            )
        prompt = self.masked.prompt.replace(MASK, mask_token)
        return ScoringRow(prompt, list(self.masked.candidates), self.label, self.uid)

    @property
    def candidate_prompts(self) -> list[str]:
        """The prompt each candidate is scored after."""
        if self.prompts is None:
            return [self.prompt] * len(self.candidates)
        return list(self.prompts)


@dataclass(frozen=True)
class CandidateBatch:
    """B rows, their P (row, candidate) pairs, in N <= P sequences.

    Pairs are grouped by row (all candidates of row 0, then of row 1...). Each of the Q
    distinct scored positions is (`score_rows`, `score_positions`), and each of the K
    scored tokens names its position (`target_slot`), its token and its pair.
    """

    input_ids: Tensor  # [N, L] long, right-padded
    attention_mask: Tensor  # [N, L] long, 1 on real tokens
    score_rows: Tensor  # [Q] long: the sequence of a scored position
    score_positions: Tensor  # [Q] long: the position whose output predicts a target
    target_slot: Tensor  # [K] long: index into the Q scored positions
    target_ids: Tensor  # [K] long: the candidate token predicted there
    target_pair: Tensor  # [K] long: the (row, candidate) pair the token belongs to
    candidate_lengths: Tensor  # [P] long: tokens per candidate (>= 1)
    example_index: Tensor  # [P] long: which row a pair belongs to
    candidate_index: Tensor  # [P] long: which candidate of that row it is
    labels: Tensor  # [B] long: the gold candidate of each row
    num_candidates: Tensor  # [B] long

    @property
    def num_examples(self) -> int:
        return self.labels.numel()

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.example_index.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CandidateBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return replace(self, **moved)  # keeps the subclass: the layout travels with it


class MaskedCandidateBatch(CandidateBatch):
    """The masked-LM layout: targets are read at `<mask>`, not at the position before."""


# ---------------------------------------------------------------------------- encoding


def rows_of(task: Task, examples: Sequence[Example]) -> list[ScoringRow]:
    """Every candidate of every example, checked: non-empty, label in range.

    A task with a `candidate_prompts(example)` method scores each candidate after its own
    prompt (`ScoringRow.prompts`); `prompt(example)` still names the row. A task's
    masked-LM form (`Task.masked_form`) rides along in `ScoringRow.masked`.
    """
    prompts_of = getattr(task, "candidate_prompts", None)
    masked_of = getattr(task, "masked_form", None)
    rows = []
    for example in examples:
        candidates = task.candidates(example)
        if not candidates:
            raise TaskError(f"example {example.uid!r} has no candidates")
        if not 0 <= example.label < len(candidates):
            raise TaskError(
                f"example {example.uid!r}: label {example.label} but {len(candidates)} candidates"
            )
        prompts = None if prompts_of is None else list(prompts_of(example))
        masked = None if masked_of is None else masked_of(example)
        if masked is not None and len(masked.candidates) != len(candidates):
            raise TaskError(
                f"task {task.name!r}: example {example.uid!r} has {len(candidates)} "
                f"candidates but its masked-LM form reads {len(masked.candidates)} words"
            )
        rows.append(
            ScoringRow(
                task.prompt(example),
                list(candidates),
                example.label,
                example.uid,
                prompts,
                masked,
            )
        )
    return rows


def bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer itself prepends BOS to plain text, else [].

    Prompts and candidates are tokenized without special tokens (some tokenizers also
    append EOS, which would sit between prompt and candidate), so BOS is added by hand,
    exactly when the tokenizer would have added it: Llama and OPT (whose BOS is `</s>`)
    do, Qwen2 and SmolLM2 do not.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def _special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text: ([<s>], [</s>]) for RoBERTa."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return with_special[:start], with_special[start + len(without) :]
    return [], []


def pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            # A list of EOS ids (some chat models) pads with the first; pad ids are masked.
            return int(value[0] if isinstance(value, list | tuple) else value)
    raise TaskError("the tokenizer has neither a pad nor an eos token to pad with")


class _Layout:
    """Accumulates sequences and scored tokens, then pads them into a CandidateBatch."""

    def __init__(self) -> None:
        self.sequences: list[list[int]] = []
        self.slots: dict[tuple[int, int], int] = {}  # (sequence, position) -> slot index
        self.target_slot: list[int] = []
        self.target_ids: list[int] = []
        self.target_pair: list[int] = []
        self.lengths: list[int] = []
        self.example_index: list[int] = []
        self.candidate_index: list[int] = []

    def add_pair(self, row: int, candidate: int, targets: list[tuple[int, int, int]]) -> None:
        """A pair whose token `t` is scored at (sequence, position) for each (s, p, t)."""
        for sequence, position, token in targets:
            self.target_slot.append(self.slots.setdefault((sequence, position), len(self.slots)))
            self.target_ids.append(token)
            self.target_pair.append(len(self.lengths))
        self.lengths.append(len(targets))
        self.example_index.append(row)
        self.candidate_index.append(candidate)

    def batch(
        self, rows: Sequence[ScoringRow], pad: int, cls: type[CandidateBatch]
    ) -> CandidateBatch:
        width = max(len(sequence) for sequence in self.sequences)
        input_ids = torch.full((len(self.sequences), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(self.sequences), width), dtype=torch.long)
        for i, sequence in enumerate(self.sequences):
            input_ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[i, : len(sequence)] = 1

        def long(values: Sequence[int]) -> Tensor:
            return torch.tensor(list(values), dtype=torch.long)

        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            score_rows=long([sequence for sequence, _ in self.slots]),
            score_positions=long([position for _, position in self.slots]),
            target_slot=long(self.target_slot),
            target_ids=long(self.target_ids),
            target_pair=long(self.target_pair),
            candidate_lengths=long(self.lengths),
            example_index=long(self.example_index),
            candidate_index=long(self.candidate_index),
            labels=long([row.label for row in rows]),
            num_candidates=long([len(row.candidates) for row in rows]),
        )


def _tokenized_candidates(tokenizer: Any, rows: Sequence[ScoringRow]) -> list[list[list[int]]]:
    cache: dict[str, list[int]] = {}  # verbalizers repeat: tokenize each string once
    result = []
    for row in rows:
        if not row.candidates:
            raise TaskError(f"example {row.uid!r} has no candidates")
        for candidate in row.candidates:
            if candidate not in cache:
                ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise TaskError(f"candidate {candidate!r} tokenizes to no tokens")
                cache[candidate] = ids
        result.append([cache[candidate] for candidate in row.candidates])
    return result


def prompt_room(
    row: ScoringRow, answers: Sequence[Sequence[int]], bos: Sequence[int], max_length: int
) -> int:
    """How many prompt tokens (after BOS) a row keeps, the same for all its candidates.

    One room per row, sized for its longest candidate: every candidate is then scored
    after the same context (or, with a prompt each, contexts cut alike), so their scores
    stay comparable.
    """
    longest = max(len(answer) for answer in answers)
    room = max_length - len(bos) - longest
    # At least one context token must precede a candidate to predict its first token.
    if room < (0 if bos else 1):
        raise TaskError(
            f"example {row.uid!r}: a candidate is {longest} tokens, so "
            f"max_length={max_length} leaves no room for the prompt"
        )
    return room


def cut_context(row: ScoringRow, bos: list[int], prompt: list[int], room: int) -> list[int]:
    """BOS and the last `room` tokens of the prompt: what a candidate is scored after."""
    context = bos + prompt[max(0, len(prompt) - room) :]
    if not context:
        raise TaskError(f"example {row.uid!r}: empty prompt and no BOS token")
    return context


def encode_rows(
    tokenizer: Any, rows: Sequence[ScoringRow], max_length: int = 256
) -> CandidateBatch:
    """The causal-LM layout of `rows`: one right-padded batch.

    Prompt and candidate are tokenized separately and their ids concatenated, so the
    scored tokens are exactly the candidate's. A prompt too long for `max_length` loses
    tokens from the left (after BOS), cut to the same room for every prompt of a row so
    that its longest candidate fits; candidates are never cut.
    """
    if not rows:
        raise TaskError("encoding needs at least one example")
    bos = bos_prefix(tokenizer)
    answers_of = _tokenized_candidates(tokenizer, rows)
    texts = list(dict.fromkeys(text for row in rows for text in row.candidate_prompts))
    prompt_ids = dict(
        zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True)
    )
    layout = _Layout()
    for b, (row, answers) in enumerate(zip(rows, answers_of, strict=True)):
        room = prompt_room(row, answers, bos, max_length)
        sharing: dict[str, list[int]] = {}  # prompt -> the candidates scored after it
        for c, text in enumerate(row.candidate_prompts):
            sharing.setdefault(text, []).append(c)
        scored_at: dict[int, tuple[int, int]] = {}  # candidate -> (sequence, first position)
        for text, members in sharing.items():
            context = cut_context(row, bos, prompt_ids[text], room)
            first = len(context) - 1  # the position that predicts a candidate's first token
            # A sequence per multi-token candidate holds its first len - 1 tokens (the last
            # is predicted, never read). One-token candidates need only the context, which
            # every sequence of this prompt starts with: they ride on the first one, or on
            # a context-only sequence when no candidate is longer than one token.
            longer = [c for c in members if len(answers[c]) > 1]
            for c in longer:
                scored_at[c] = (len(layout.sequences), first)
                layout.sequences.append(context + answers[c][:-1])
            if not longer:
                layout.sequences.append(list(context))
            host = scored_at[longer[0]][0] if longer else len(layout.sequences) - 1
            for c in members:
                scored_at.setdefault(c, (host, first))
        for c, answer in enumerate(answers):
            sequence, first = scored_at[c]
            layout.add_pair(b, c, [(sequence, first + j, t) for j, t in enumerate(answer)])
    return layout.batch(rows, pad_id(tokenizer), CandidateBatch)


def encode_masked_rows(
    tokenizer: Any, rows: Sequence[ScoringRow], max_length: int = 256
) -> MaskedCandidateBatch:
    """The masked-LM layout of `rows`: `<s> prompt <mask> </s>`, candidates read at the mask.

    A row with a masked-LM form (`ScoringRow.masked`) is read in that form. A prompt that
    holds the tokenizer's mask token (a template's mask slot, as in "{text} It
    was<mask>.") is scored there; otherwise the mask is appended to it, and candidates
    carry their own leading space as for causal LMs. Prompts too long lose tokens from
    the left; the mask and what follows it are never cut.
    """
    if not rows:
        raise TaskError("encoding needs at least one example")
    mask = getattr(tokenizer, "mask_token_id", None)
    if mask is None:
        raise TaskError(
            "masked-LM scoring needs a tokenizer with a mask token; this one has none "
            "(pair tiny RoBERTa models with zo.models.masked_byte_tokenizer())"
        )
    rows = [row.for_masked_lm(tokenizer.mask_token) for row in rows]
    prefix, suffix = _special_wrapping(tokenizer)
    room = max_length - len(prefix) - len(suffix)
    prompts = tokenizer([row.prompt for row in rows], add_special_tokens=False)["input_ids"]
    layout = _Layout()
    for b, (row, prompt, answers) in enumerate(
        zip(rows, prompts, _tokenized_candidates(tokenizer, rows), strict=True)
    ):
        if row.prompts is not None:
            raise TaskError(
                f"example {row.uid!r} scores each candidate after a prompt of its own "
                "(partial scoring, as WinoGrande's); a masked LM reads one prompt per row "
                "and one token at <mask>, so it cannot score that: use a causal LM"
            )
        for candidate, answer in zip(row.candidates, answers, strict=True):
            if len(answer) != 1:
                tokens = tokenizer.convert_ids_to_tokens(answer)
                raise TaskError(
                    f"example {row.uid!r}: candidate {candidate!r} is {len(answer)} tokens "
                    f"{tokens}; a masked LM scores one token at <mask>, so every candidate "
                    "must be a single token (mind the leading space) - choose one-token "
                    "verbalizer words or use a causal LM"
                )
        masks = prompt.count(mask)
        if masks > 1:
            raise TaskError(f"example {row.uid!r}: the prompt holds {masks} mask tokens, not 1")
        ids = list(prompt) if masks else [*prompt, mask]
        after = len(ids) - ids.index(mask)
        if after > room:
            raise TaskError(
                f"example {row.uid!r}: the mask and the {after - 1} tokens after it do not "
                f"fit max_length={max_length}"
            )
        ids = ids[max(0, len(ids) - room) :]
        position = len(prefix) + ids.index(mask)
        layout.sequences.append(prefix + ids + suffix)
        for c, answer in enumerate(answers):
            layout.add_pair(b, c, [(b, position, answer[0])])
    return layout.batch(rows, pad_id(tokenizer), MaskedCandidateBatch)


def encode_candidates(
    tokenizer: Any, task: Task, examples: Sequence[Example], max_length: int = 256
) -> CandidateBatch:
    """Every (example, candidate) pair of a task in the causal-LM layout."""
    if not examples:
        raise TaskError("encode_candidates needs at least one example")
    return encode_rows(tokenizer, rows_of(task, examples), max_length)


# ------------------------------------------------------------------- models and scorers


def _unwrapped(model: nn.Module) -> nn.Module:
    # A PEFT wrapper is looked through: the adapters are injected into the wrapped
    # model's layers, and the wrapper's own `base_model` is the LoRA container.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_masked_lm(model: nn.Module) -> bool:
    """A transformers *ForMaskedLM model (or a subclass, or one wrapped by PEFT)."""
    return any(cls.__name__.endswith("ForMaskedLM") for cls in type(_unwrapped(model)).__mro__)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer without its LM head, and the head that maps hidden states to logits.

    `base_model` is the backbone of every transformers *ForCausalLM and *ForMaskedLM
    (LlamaModel, OPTModel (its decoder applies the final layer norm), RobertaModel...).
    The head is the model's child that holds the output embedding: the embedding itself
    for causal LMs, RoBERTa's `lm_head` (dense, GELU, layer norm, then the embedding).
    """
    model = _unwrapped(model)
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


# ----------------------------------------------------------------------------- scoring


def token_log_probs(model: nn.Module, batch: CandidateBatch) -> Tensor:
    """[K]: the fp32 log-probability of each scored candidate token."""
    scorer = scorer_for(model)
    if type(batch) is not scorer.layout:
        raise TaskError(
            f"the batch has the {type(batch).__name__} layout but {type(model).__name__} "
            f"needs {scorer.layout.__name__}: encode it for this model "
            "(tasks.evaluation.make_batch(..., model=model))"
        )
    backbone, head = backbone_and_head(model)
    # use_cache=False: a KV cache would be built for nothing and cost memory.
    output = backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    )
    hidden = output[0]  # last_hidden_state, as a ModelOutput or a tuple
    picked = hidden[batch.score_rows, batch.score_positions]  # [Q, H]
    log_probs = head_logits(model, head, picked).log_softmax(dim=-1)  # [Q, V]
    return log_probs[batch.target_slot, batch.target_ids]


def pair_totals(batch: Any, token_scores: Tensor, normalize: bool = True) -> Tensor:
    """[P]: the scored tokens summed per pair, divided by the pair's length if `normalize`.

    `batch` is any layout with the pair fields of a CandidateBatch (target_pair,
    candidate_lengths, ...), as the prefix-cache layout (`tasks.prefix_cache`) has.
    """
    totals = token_scores.new_zeros(batch.num_pairs).index_add(0, batch.target_pair, token_scores)
    return totals / batch.candidate_lengths.to(totals.dtype) if normalize else totals


def candidate_table(batch: Any, pair_scores: Tensor) -> Tensor:
    """[B, C_max]: the pair scores arranged per row and candidate; -inf where none."""
    max_candidates = int(batch.num_candidates.max())
    table = pair_scores.new_full((batch.num_examples, max_candidates), float("-inf"))
    # Out of place, so autograd sees it (first-order baselines differentiate this).
    return table.index_put((batch.example_index, batch.candidate_index), pair_scores)


def pair_log_likelihoods(model: nn.Module, batch: CandidateBatch, normalize: bool = True) -> Tensor:
    """[P]: each pair's candidate log-likelihood, the mean over its tokens (or the sum)."""
    return pair_totals(batch, token_log_probs(model, batch), normalize)


def candidate_log_likelihoods(
    model: nn.Module, batch: CandidateBatch, normalize: bool = True
) -> Tensor:
    """[B, C_max]: the log-likelihood of each candidate (length-normalised); -inf where none."""
    return candidate_table(batch, pair_log_likelihoods(model, batch, normalize))


def classification_loss(model: nn.Module, batch: CandidateBatch) -> Tensor:
    """Mean over examples of -log softmax(candidate scores)[gold]: a scalar tensor.

    Works under `torch.no_grad()` (ZO closures) and with autograd alike; the -inf padding
    gets zero probability and zero gradient.
    """
    return F.cross_entropy(candidate_log_likelihoods(model, batch), batch.labels)


def teacher_forcing_loss(model: nn.Module, batch: CandidateBatch) -> Tensor:
    """Mean NLL over the gold candidates' tokens, pooled over the batch: a scalar tensor.

    The causal-LM loss with labels -100 on prompt and padding (MeZO's loss for multiple
    choice and generation): every gold token counts once, so long answers weigh more.
    """
    token_scores = token_log_probs(model, batch)
    pair = batch.target_pair
    gold = batch.candidate_index[pair] == batch.labels[batch.example_index[pair]]
    return -token_scores[gold].mean()


# -------------------------------------------------------------------------- evaluation


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


def score_rows(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[ScoringRow],
    batch_size: int = 32,
    max_length: int = 256,
    normalize: bool = True,
    prefix_cache: str = "never",
) -> list[Tensor]:
    """Per row, the [C] candidate log-likelihoods (on CPU), in `batch_size`-row forwards.

    Rows are batched in order of prompt length, so a batch pads to similar lengths; the
    result is in the order of `rows`. Call it under `evaluation_mode` or `no_grad`.
    `prefix_cache` ("auto", "always", "never"): whether a batch may run each shared
    prompt once and score the candidates after its KV cache (`tasks.prefix_cache`, which
    states the rule); the scores agree up to rounding.
    """
    if batch_size < 1:
        raise TaskError(f"batch_size must be >= 1, got {batch_size}")
    check_choice("prefix_cache", prefix_cache, PREFIX_CACHE_MODES)
    scorer, device = scorer_for(model), model_device(model)
    # Imported here: tasks.prefix_cache builds on this module.
    from tasks.prefix_cache import prefix_table, use_prefix_cache

    cached = use_prefix_cache(model, prefix_cache)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt))
    scores: list[Tensor | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        part = [rows[i] for i in chunk]
        table = None
        if cached:
            table = prefix_table(model, tokenizer, part, max_length, normalize, prefix_cache)
        if table is None:
            batch = scorer.encode(tokenizer, part, max_length).to(device)
            table = candidate_log_likelihoods(model, batch, normalize)
        table = table.cpu()
        for b, i in enumerate(chunk):
            scores[i] = table[b, : len(rows[i].candidates)]
    return scores  # type: ignore[return-value]  (every slot is filled)


def predict(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    batch_size: int = 32,
    max_length: int = 256,
    prefix_cache: str = "auto",
) -> list[int]:
    """The index of the best-scoring candidate per example."""
    with evaluation_mode(model):
        rows = rows_of(task, examples)
        scores = score_rows(model, tokenizer, rows, batch_size, max_length, True, prefix_cache)
    return [int(s.argmax()) for s in scores]
