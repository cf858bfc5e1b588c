"""Tasks against references: data hygiene, clear errors, and candidate scores equal to a
naive full-logits computation done one (example, candidate) pair at a time."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import processors

import tasks
from tasks import (
    ClassificationTask,
    Example,
    Task,
    TaskError,
    candidate_log_likelihoods,
    classification_loss,
    encode_candidates,
    evaluate,
    get_task,
    predict,
    register_task,
)
from tasks.files import split_files
from tasks.registry import TaskTraits, task_registration
from zo.models import byte_tokenizer, tiny_model

FAMILIES = ["llama", "opt"]
TASKS_DIR = Path(tasks.__file__).parent


# ------------------------------------------------------------------------------ helpers


@dataclass
class VaryingTask(Task):
    """Candidates of different counts and token lengths per example (like COPA/ReCoRD)."""

    name: str = "varying"

    def load(self, split: str) -> list[Example]:
        raise NotImplementedError

    def prompt(self, example: Example) -> str:
        return example.fields["text"]

    def candidates(self, example: Example) -> list[str]:
        return example.fields["options"]


VARYING = [
    Example({"text": "Tea or", "options": [" coffee", " milk"]}, label=0, uid="a"),
    Example(
        {
            "text": "The longest prompt of this little batch ends",
            "options": [" here", ".", " now!"],
        },
        label=2,
        uid="b",
    ),
    # one-token candidates first: they must ride on the later multi-token sequence
    Example({"text": "Hi", "options": ["?", " there, friend", "!"]}, label=1, uid="c"),
    Example({"text": "Yes or no", "options": ["y", "n"]}, label=0, uid="d"),  # one sequence
]


def reference_scores(model, tokenizer, task: Task, example: Example) -> list[float]:
    """Per candidate: full logits of the unpadded sequence, log_softmax, gather, mean."""
    prompt = tokenizer(task.prompt(example))["input_ids"]  # with the tokenizer's own BOS
    scores = []
    for candidate in task.candidates(example):
        answer = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = model(ids).logits[0].float().log_softmax(-1)
        start = len(prompt)
        picked = [logp[start - 1 + j, token] for j, token in enumerate(answer)]
        scores.append(float(torch.stack(picked).mean()))
    return scores


def bos_tokenizer():
    """The byte tokenizer, made to prepend <s> like Llama/OPT tokenizers do."""
    tokenizer = byte_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return tokenizer


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sentiment():
    return get_task("sentiment")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return tiny_model(request.param, seed=1)


# ------------------------------------------------------------------------------ package


def test_import_is_light_and_one_way():
    code = "import sys, tasks; assert 'torch' not in sys.modules and 'datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=TASKS_DIR.parent)
    for source in TASKS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                # the one registry form is the only module of ours tasks may import
                if name.split(".")[0] in {"zo", "estimators"}:
                    assert name == "zo.registry", f"{source.name}: {name}"


def test_registry_lists_builds_and_rejects():
    assert {"sentiment", "jsonl"} <= set(tasks.available_tasks())
    with pytest.raises(TaskError, match=r"unknown task 'sst9'.*sentiment"):
        get_task("sst9")
    with pytest.raises(TaskError, match=r"'sentiment'.*options are \['template'"):
        get_task("sentiment", tempalte="{text}")
    custom = get_task("sentiment", template="Review: {text} Verdict:")
    assert custom.prompt(Example({"text": "Fine."}, 0, "x")) == "Review: Fine. Verdict:"


def test_register_task_one_call_with_options_dataclass_and_traits():
    @dataclass(frozen=True)
    class VaryingOptions:
        scale: int = 1

    def make(options: VaryingOptions) -> Task:
        return VaryingTask()

    assert register_task("test-varying", VaryingOptions, make, kinds=("classification",),
                         fixtures=False) is make  # fmt: skip
    assert isinstance(get_task("test-varying", scale=2), VaryingTask)
    assert task_registration("test-varying").traits == TaskTraits(("classification",), False)
    with pytest.raises(
        TaskError, match=r"unknown option\(s\) \['size'\]; its options are \['scale'\]"
    ):
        get_task("test-varying", size=2)
    with pytest.raises(TaskError, match="already registered"):
        register_task("test-varying", VaryingOptions, make, kinds=("classification",),
                      fixtures=False)  # fmt: skip
    with pytest.raises(TypeError, match="kinds"):
        register_task("test-bad-kind", VaryingOptions, make, kinds=("ranking",), fixtures=False)
    with pytest.raises(TypeError, match="dataclass"):
        register_task("test-no-dataclass", dict, make, kinds=("generation",), fixtures=False)


# ------------------------------------------------------------------------------ data


def test_sentiment_data_is_clean_and_balanced(sentiment):
    train, dev = sentiment.load("train"), sentiment.load("dev")
    assert len(train) == 300 and len(dev) == 100
    for split in (train, dev):
        texts = [e.fields["text"].strip().lower() for e in split]
        assert len(set(texts)) == len(texts), "duplicate text within a split"
        counts = [sum(e.label == c for e in split) for c in (0, 1)]
        assert min(counts) >= 0.4 * len(split), counts
        for e in split:
            assert 5 <= len(e.fields["text"].split()) <= 20, e.fields["text"]
            assert sentiment.prompt(e) == e.fields["text"] + " It was"
            assert sentiment.candidates(e)[e.label] == [" terrible", " great"][e.fields["label"]]
    overlap = {e.fields["text"].lower() for e in train} & {e.fields["text"].lower() for e in dev}
    assert not overlap
    assert len({e.uid for e in train + dev}) == 400


def test_loading_is_offline_and_leaves_no_cache(tmp_path, monkeypatch):
    import datasets

    def no_network(*args, **kwargs):
        raise AssertionError("tasks tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = set(cache.rglob("*")) if cache.exists() else set()
    path = write(
        tmp_path / "train.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    )
    task = get_task("jsonl", path=path, template="{text}!", verbalizer={0: " no", 1: " yes"})
    assert [e.label for e in task.load("train")] == [1, 0]
    after = set(cache.rglob("*")) if cache.exists() else set()
    assert after == before


def test_jsonl_task_string_labels_and_split_files(tmp_path):
    write(tmp_path / "train.jsonl", [{"q": "Goal!", "topic": "sport", "id": 7}])
    write(tmp_path / "dev.jsonl", [{"q": "Rain", "topic": "weather"}])
    task = get_task(
        "jsonl",
        path=tmp_path,
        template="{q}\nTopic:",
        label="topic",
        verbalizer={"weather": " weather", "sport": " sport"},
    )
    (train,) = task.load("train")
    assert (train.label, train.uid, task.prompt(train)) == (1, "7", "Goal!\nTopic:")
    assert task.load("dev")[0].label == 0
    assert split_files(str(tmp_path / "{split}.jsonl"))["dev"] == tmp_path / "dev.jsonl"
    only_train = get_task("jsonl", path=tmp_path / "train.jsonl", template="{q}", label="topic",
                          verbalizer={"weather": " w", "sport": " s"})  # fmt: skip
    with pytest.raises(TaskError, match=r"no 'dev' split"):
        only_train.load("dev")


# ------------------------------------------------------------------------------ errors


def make_task(path: Path) -> ClassificationTask:
    return ClassificationTask(
        name="t", template="{title}: {text} It was", verbalizer={0: " bad", 1: " good"},
        data_files={"train": path},
    )  # fmt: skip


def test_missing_file_names_path_and_format(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(TaskError) as error:
        make_task(path).load("train")
    message = str(error.value)
    assert str(path) in message and "not found" in message
    assert "JSONL" in message and "title, text, label" in message


def test_empty_file_names_path(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(TaskError, match=rf"{path}.* is empty"):
        make_task(path).load("train")


def test_missing_template_field_names_path_and_row(tmp_path):
    rows = [{"title": "A", "text": "x", "label": 0}, "", {"title": "B", "label": 1}]
    path = write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(TaskError, match=rf"{path}:3 \(row 2\).*field 'text' is missing"):
        make_task(path).load("train")


def test_label_outside_verbalizer_names_path_and_row(tmp_path):
    path = write(tmp_path / "rows.jsonl", [{"title": "A", "text": "x", "label": 0},
                                            {"title": "B", "text": "y", "label": 2}])  # fmt: skip
    with pytest.raises(TaskError, match=rf"{path}:2 \(row 2\): label 2 is not in the verbalizer"):
        make_task(path).load("train")


def test_malformed_line_names_path_and_line(tmp_path):
    path = write(tmp_path / "rows.jsonl", [{"title": "A", "text": "x", "label": 0}, "{oops"])
    with pytest.raises(TaskError, match=rf"{path}:2: not valid JSON"):
        make_task(path).load("train")


def test_bad_task_definitions_are_rejected(tmp_path):
    files = {"train": tmp_path / "x.jsonl"}
    with pytest.raises(TaskError, match="no {field} placeholder"):
        ClassificationTask("t", "It was", {0: " a", 1: " b"}, files)
    with pytest.raises(TaskError, match="plain field name"):
        ClassificationTask("t", "{row[text]}", {0: " a", 1: " b"}, files)
    with pytest.raises(TaskError, match="at least two labels"):
        ClassificationTask("t", "{text}", {0: " a"}, files)
    with pytest.raises(TaskError, match="share a verbalizer string"):
        ClassificationTask("t", "{text}", {0: " a", 1: " a"}, files)


# ------------------------------------------------------------------------------ encoding


def test_encoding_layout_bos_padding_and_truncation(sentiment):
    tokenizer = bos_tokenizer()
    examples = sentiment.load("dev")[:3]
    batch = encode_candidates(tokenizer, sentiment, examples, max_length=20)
    terrible = tokenizer(" terrible", add_special_tokens=False)["input_ids"]
    great = tokenizer(" great", add_special_tokens=False)["input_ids"]
    # every prompt is cut to leave room for BOS and the longest candidate, once per example
    kept = 20 - 1 - len(terrible)
    # a candidate's last token is predicted, never read, so it is not an input
    assert batch.input_ids.shape == (6, 1 + kept + len(terrible) - 1)
    assert batch.example_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.candidate_index.tolist() == [0, 1, 0, 1, 0, 1]
    assert batch.labels.tolist() == [e.label for e in examples]
    assert batch.num_candidates.tolist() == [2, 2, 2]
    assert (batch.input_ids[:, 0] == tokenizer.bos_token_id).all()  # BOS survives the cut
    prompt = tokenizer(sentiment.prompt(examples[0]), add_special_tokens=False)["input_ids"]
    context = [tokenizer.bos_token_id, *prompt[-kept:]]  # cut on the left
    for row, answer in ((0, terrible), (1, great)):
        length = int(batch.attention_mask[row].sum())
        assert batch.input_ids[row, :length].tolist() == context + answer[:-1]
        assert batch.input_ids[row, length:].eq(tokenizer.pad_token_id).all()
        mine = batch.target_pair == row  # pairs and rows coincide: no one-token candidates
        assert batch.target_ids[mine].tolist() == answer  # the candidate is never cut
        slots = batch.target_slot[mine]
        assert batch.score_rows[slots].eq(row).all()
        first = len(context) - 1  # the position that predicts the first candidate token
        assert batch.score_positions[slots].tolist() == list(range(first, first + len(answer)))
    assert batch.candidate_lengths.tolist() == [len(terrible), len(great)] * 3
    # BOS alone is context enough; without BOS one prompt token must stay
    assert encode_candidates(tokenizer, sentiment, examples, len(terrible) + 1).input_ids.shape[1]
    for tok, length in ((tokenizer, len(terrible)), (byte_tokenizer(), len(terrible))):
        with pytest.raises(TaskError, match="leaves no room"):
            encode_candidates(tok, sentiment, examples, max_length=length)


def test_one_token_candidates_share_a_sequence():
    batch = encode_candidates(byte_tokenizer(), VaryingTask(), VARYING)
    # a: 2 sequences; b: " here", " now!" (+ "." riding); c: " there, friend" (+ 2 riding);
    # d: one context-only sequence for both
    assert batch.num_sequences == 2 + 2 + 1 + 1 and batch.num_pairs == 10
    d = batch.example_index == 3
    assert batch.candidate_lengths[d].tolist() == [1, 1]
    assert batch.score_rows.numel() < batch.target_ids.numel()  # shared positions, once each


def test_batch_to_moves_every_tensor(sentiment):
    batch = encode_candidates(byte_tokenizer(), sentiment, sentiment.load("dev")[:2])
    moved = batch.to("meta")
    assert all(t.device.type == "meta" for t in vars(moved).values())
    assert moved.num_examples == 2 and moved.num_sequences == moved.num_pairs == 4


# ------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("use_bos", [False, True])
def test_scores_equal_full_logits_reference(tiny, use_bos):
    model, tokenizer = tiny
    tokenizer = bos_tokenizer() if use_bos else tokenizer
    task = VaryingTask()
    batch = encode_candidates(tokenizer, task, VARYING)
    with torch.no_grad():
        scores = candidate_log_likelihoods(model, batch)
    assert scores.shape == (4, 3) and scores.dtype == torch.float32
    for b, example in enumerate(VARYING):
        reference = reference_scores(model, tokenizer, task, example)
        n = len(reference)
        torch.testing.assert_close(scores[b, :n], torch.tensor(reference), atol=1e-5, rtol=0)
        assert torch.isneginf(scores[b, n:]).all()


def test_head_sees_only_scored_positions(tiny, sentiment):
    model, tokenizer = tiny
    batch = encode_candidates(tokenizer, sentiment, sentiment.load("train")[:4])
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(tuple(out.shape))
    )
    try:
        with torch.no_grad():
            candidate_log_likelihoods(model, batch)
    finally:
        handle.remove()
    assert seen == [(batch.score_rows.numel(), model.config.vocab_size)]


def test_padding_and_batch_company_do_not_change_scores(tiny):
    model, tokenizer = tiny
    task = VaryingTask()
    with torch.no_grad():
        together = candidate_log_likelihoods(model, encode_candidates(tokenizer, task, VARYING))
        for b, example in enumerate(VARYING):
            alone = candidate_log_likelihoods(model, encode_candidates(tokenizer, task, [example]))
            n = alone.shape[1]
            torch.testing.assert_close(together[b, :n], alone[0], atol=1e-5, rtol=0)


def test_truncated_sequences_score_like_their_reference(tiny, sentiment):
    model, tokenizer = tiny
    example = sentiment.load("train")[0]
    batch = encode_candidates(tokenizer, sentiment, [example], max_length=16)
    with torch.no_grad():
        scores = candidate_log_likelihoods(model, batch)[0]
    prompt = tokenizer(sentiment.prompt(example), add_special_tokens=False)["input_ids"]
    answers = [
        tokenizer(c, add_special_tokens=False)["input_ids"] for c in sentiment.candidates(example)
    ]
    start = 16 - max(len(answer) for answer in answers)  # the context all candidates share
    for c, answer in enumerate(answers):
        ids = prompt[-start:] + answer
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        expected = torch.stack([logp[start - 1 + j, t] for j, t in enumerate(answer)]).mean()
        torch.testing.assert_close(scores[c], expected, atol=1e-5, rtol=0)


def test_softcapping_is_applied():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = byte_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    task = VaryingTask()
    with torch.no_grad():
        scores = candidate_log_likelihoods(model, encode_candidates(tokenizer, task, VARYING))
    reference = reference_scores(model, tokenizer, task, VARYING[0])
    torch.testing.assert_close(scores[0, :2], torch.tensor(reference), atol=1e-5, rtol=0)


def test_lora_wrapped_model_scores_through_the_adapters(sentiment):
    peft = pytest.importorskip("peft")
    model, tokenizer = tiny_model("llama", seed=2)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    task = VaryingTask()
    with torch.no_grad():
        scores = candidate_log_likelihoods(wrapped, encode_candidates(tokenizer, task, VARYING))
    reference = reference_scores(wrapped, tokenizer, task, VARYING[1])
    torch.testing.assert_close(scores[1], torch.tensor(reference), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ loss


def test_loss_equals_cross_entropy_of_reference_scores(tiny):
    model, tokenizer = tiny
    task = VaryingTask()
    with torch.no_grad():
        loss = classification_loss(model, encode_candidates(tokenizer, task, VARYING))
    expected = 0.0
    for example in VARYING:
        reference = torch.tensor(reference_scores(model, tokenizer, task, example))
        expected += float(-reference.log_softmax(0)[example.label])
    assert loss.dim() == 0 and not loss.requires_grad
    assert loss.item() == pytest.approx(expected / len(VARYING), abs=1e-5)


def test_loss_has_a_finite_gradient_under_autograd(tiny):
    model, tokenizer = tiny
    batch = encode_candidates(tokenizer, VaryingTask(), VARYING)  # -inf padding included
    model.zero_grad(set_to_none=True)
    classification_loss(model, batch).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------ evaluation


def test_batched_predictions_equal_one_at_a_time(tiny, sentiment):
    model, tokenizer = tiny
    examples = sentiment.load("dev")[:12]
    batched = predict(model, tokenizer, sentiment, examples, batch_size=5, max_length=64)
    single = [predict(model, tokenizer, sentiment, [e], max_length=64)[0] for e in examples]
    assert batched == single
    result = evaluate(model, tokenizer, sentiment, examples, batch_size=5, max_length=64)
    correct = sum(p == e.label for p, e in zip(batched, examples, strict=True))
    assert result["num_examples"] == 12
    assert result["accuracy"] == pytest.approx(correct / 12)
    with torch.no_grad():
        loss = classification_loss(model, encode_candidates(tokenizer, sentiment, examples, 64))
    assert result["loss"] == pytest.approx(loss.item(), abs=1e-5)


def test_evaluate_leaves_every_module_mode_as_it_was(sentiment):
    model, tokenizer = tiny_model("opt", seed=3)
    examples = sentiment.load("dev")[:4]
    for setup in ("train", "eval", "mixed"):
        model.train(setup != "eval")
        if setup == "mixed":
            model.model.decoder.layers[0].eval()
        before = [m.training for m in model.modules()]
        evaluate(model, tokenizer, sentiment, examples, max_length=48)
        assert [m.training for m in model.modules()] == before, setup
    with pytest.raises(TaskError, match="no examples"):
        evaluate(model, tokenizer, sentiment, [])
