"""MeZO's RoBERTa-large tasks (SST-2, SST-5, SNLI, MNLI, RTE, TREC) in LM-BFF's masked-LM
templates, against references: the rendered templates spelled out, label words checked
against the datasets' documented label names, a tiny RoBERTa's scores against a forward
over hand-built `<s> ... <mask> ... </s>` ids, causal prompts untouched, the dataset
quirks (SNLI's unlabelled rows, split names of their own), and two training steps of
every new task through `zo train` on a tiny RoBERTa and a tiny Llama.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import tasks
from tasks import sources
from tasks.base import MASK, Example, TaskError
from tasks.encoding import ScoringRow, rows_of
from tasks.evaluation import EvalSettings, candidate_scores, content_free_row, evaluate
from tasks.losses import batch_loss, make_batch
from tasks.suite import SUITE
from tests.test_task_suite import fixture_task, no_network  # noqa: F401 (autouse fixture)
from zo import models
from zo.cli import main

ROBERTA_TASKS = ["sst2", "sst5", "snli", "mnli", "rte", "trec"]
NEW_TASKS = ["sst5", "snli", "mnli", "trec"]
ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")

# LM-BFF (Gao et al. 2021) table 1 for the first validation fixture row of each task:
# (masked prompt, words at <mask>). `sent-` drops the premise's final mark, `sentl`
# lowers the hypothesis' first letter; every word carries RoBERTa's leading space.
LM_BFF = {
    "sst2": (
        "it 's a charming little story with a big heart It was<mask>.",
        (" terrible", " great"),
    ),
    "sst5": (
        "an utter mess of a thriller with no thrills at all . It was<mask>.",
        (" terrible", " bad", " okay", " good", " great"),
    ),
    "snli": (
        "A girl in a yellow dress jumps over a puddle?<mask>, a girl is jumping.",
        (" Yes", " Maybe", " No"),
    ),
    "mnli": (
        "The report was written by a team of three researchers?<mask>, more than one "
        "person wrote the report.",
        (" Yes", " Maybe", " No"),
    ),
    "rte": (
        "The library extended its opening hours during exam week?<mask>, the library "
        "was open longer during exam week.",
        (" Yes", " No"),
    ),
    "trec": (
        "<mask>: What is the full form of UNESCO ?",
        (" Expression", " Entity", " Description", " Human", " Location", " Number"),
    ),
}

# The new tasks' causal-LM prompts (the original suite's are in tests/data/recorded_prompts).
CAUSAL = {
    "sst5": "an utter mess of a thriller with no thrills at all . It was",
    "snli": (
        "A girl in a yellow dress jumps over a puddle.\nQuestion: Does this mean that "
        '"A girl is jumping." is true? Yes, Maybe, or No?\nAnswer:'
    ),
    "mnli": (
        "The report was written by a team of three researchers.\nQuestion: Does this mean "
        'that "More than one person wrote the report." is true? Yes, Maybe, or No?\nAnswer:'
    ),
    "trec": "What is the full form of UNESCO ?\nAnswer type:",
}

# Each dataset's label names in label-index order (its Hugging Face card: GLUE/SuperGLUE
# ClassLabels, SetFit/sst5's label_text, CogComp/trec's coarse_label), and LM-BFF's word
# for each name.
LABEL_NAMES = {
    "sst2": ["negative", "positive"],
    "sst5": ["very negative", "negative", "neutral", "positive", "very positive"],
    "snli": ["entailment", "neutral", "contradiction"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "rte": ["entailment", "not_entailment"],
    "trec": ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"],
}
NLI_WORDS = {"entailment": "Yes", "neutral": "Maybe", "contradiction": "No"}
WORD_OF_LABEL = {
    "sst2": {"negative": "terrible", "positive": "great"},
    "sst5": {
        "very negative": "terrible",
        "negative": "bad",
        "neutral": "okay",
        "positive": "good",
        "very positive": "great",
    },
    "snli": NLI_WORDS,
    "mnli": NLI_WORDS,
    "rte": {"entailment": "Yes", "not_entailment": "No"},
    "trec": {
        "ABBR": "Expression",
        "ENTY": "Entity",
        "DESC": "Description",
        "HUM": "Human",
        "LOC": "Location",
        "NUM": "Number",
    },
}


def first_example(task) -> Example:
    return task.example(task.original_rows("validation")[0], uid="validation-0")


def masked_words() -> list[str]:
    return sorted({w for name in ROBERTA_TASKS for w in LM_BFF[name][1]})


def roberta_with_words(seed: int = 4):
    """A tiny RoBERTa whose tokenizer knows each label word as one token, as RoBERTa's
    vocabulary does (" great", " Yes", " Description", ...)."""
    model, tokenizer = models.tiny_model("roberta", seed=seed)
    tokenizer.add_tokens(masked_words())
    with torch.random.fork_rng(devices=[]):  # resizing draws the new rows
        torch.manual_seed(seed)
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


@pytest.fixture(scope="module")
def roberta():
    return roberta_with_words()


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize("name", ROBERTA_TASKS)
def test_masked_prompts_are_lm_bff_templates(name):
    task = fixture_task(name)
    form = task.masked_form(first_example(task))
    assert (form.prompt, form.candidates) == LM_BFF[name]
    assert form.prompt.count(MASK) == 1


@pytest.mark.parametrize("name", NEW_TASKS)
def test_new_tasks_causal_prompts(name):
    task = fixture_task(name)
    example = first_example(task)
    assert task.prompt(example) == CAUSAL[name]
    assert task.candidates(example) == list(task.verbalizer)
    assert task.kind == "classification" and task.metric == "accuracy"


@pytest.mark.parametrize("name", ROBERTA_TASKS)
def test_label_words_follow_each_datasets_label_names(name):
    task = SUITE[name]
    words = task.masked_verbalizer or task.verbalizer
    assert list(words) == [" " + WORD_OF_LABEL[name][label] for label in LABEL_NAMES[name]]


def test_sst5_fixture_label_texts_agree_with_the_label_order():
    task = fixture_task("sst5")
    for split in ("train", "validation"):
        for row in task.original_rows(split):
            assert row["label_text"] == LABEL_NAMES["sst5"][row["label"]]


def test_lm_bff_sentence_variants():
    rte = SUITE["rte"]
    example = Example({"premise": " No mark at the end ", "hypothesis": "Ends here"}, 0, "v")
    assert rte().masked_form(example).prompt == "No mark at the end?<mask>, ends here"
    with pytest.raises(TaskError, match="spec 'shout' is not one of"):
        type("Bad", (rte,), {"masked_template": "{premise:shout}<mask>"})().masked_form(example)


# ------------------------------------------------------------------ scores and prompts


def hand_ids(tokenizer, masked_prompt: str) -> list[int]:
    """<s> text-before <mask> text-after </s>, each piece tokenized on its own."""
    before, after = masked_prompt.split(MASK)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    body = ids(before) + [tokenizer.mask_token_id] + ids(after)
    return [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]


def hand_scores(model, tokenizer, masked_prompt: str, words) -> torch.Tensor:
    ids = hand_ids(tokenizer, masked_prompt)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, ids.index(tokenizer.mask_token_id)]
    return logits.float().log_softmax(-1)[[tokenizer.convert_tokens_to_ids(w) for w in words]]


@pytest.mark.parametrize("name", ROBERTA_TASKS)
def test_roberta_scores_equal_a_hand_computation_at_the_mask(roberta, name):
    model, tokenizer = roberta
    task = fixture_task(name)
    example = first_example(task)
    reference = hand_scores(model, tokenizer, *LM_BFF[name])
    (scores,) = candidate_scores(model, tokenizer, task, [example], EvalSettings())
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
    # training reads the same: its loss is the cross-entropy over these scores
    batch = make_batch(tokenizer, task, [example], model=model)
    assert tokenizer.decode(batch.pairs.input_ids[0]) == f"<s>{LM_BFF[name][0]}</s>"
    with torch.no_grad():
        loss = batch_loss(model, batch)
    expected = -reference.log_softmax(0)[example.label]
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("name", ROBERTA_TASKS)
def test_causal_models_read_the_causal_prompt(name):
    model, tokenizer = models.tiny_model("llama", seed=1)
    task = fixture_task(name)
    example = first_example(task)
    batch = make_batch(tokenizer, task, [example], model=model).pairs
    prompt = tokenizer(task.prompt(example), add_special_tokens=False)["input_ids"]
    # the sequence starts with the causal prompt, and no mask is anywhere
    assert batch.input_ids[0, : len(prompt)].tolist() == prompt
    assert MASK not in tokenizer.decode(batch.input_ids[0])
    scored = [
        tokenizer.decode(batch.target_ids[batch.target_pair == p])
        for p in range(len(task.verbalizer))
    ]
    assert scored == list(task.verbalizer)


def test_a_row_changed_after_its_masked_form_was_made_is_refused(roberta):
    model, tokenizer = roberta
    task = fixture_task("sst2")
    (row,) = rows_of(task, [first_example(task)])
    assert row.for_masked_lm("[MASK]").prompt == LM_BFF["sst2"][0].replace(MASK, "[MASK]")
    assert row.for_masked_lm().candidates == list(LM_BFF["sst2"][1])
    plain = ScoringRow("no form", [" a", " b"], 0, "p")
    assert plain.for_masked_lm() is plain
    # calibration's content-free prompt replaces `prompt` only: a stale form is an error
    stale = replace(row, prompt=" It was")
    with pytest.raises(TaskError, match="changed after its masked-LM form was made"):
        stale.for_masked_lm()

    # calibration builds its content-free input as a row of its own, masked form included
    example = first_example(task)
    free = content_free_row(task, example, row, "N/A")
    blank = replace(
        example, fields={k: "N/A" if isinstance(v, str) else v for k, v in example.fields.items()}
    )
    assert free.for_masked_lm().prompt == task.masked_form(blank).prompt
    assert "N/A" in free.for_masked_lm().prompt and MASK in free.for_masked_lm().prompt
    result = evaluate(model, tokenizer, task, task.load("test")[:2], calibrate=True)
    assert 0.0 <= result["score"] <= 1.0


# ------------------------------------------------------------------------------ sources


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def nli_rows(count: int) -> list[dict]:
    return [
        {"premise": f"Premise {i}.", "hypothesis": f"Hypothesis {i}.", "label": i % 3}
        for i in range(count)
    ]


@pytest.mark.parametrize("name", ["snli", "mnli"])
def test_unlabelled_nli_rows_are_dropped_from_a_local_source(tmp_path, name):
    rows = nli_rows(6)
    rows[2]["label"] = -1  # SNLI: the annotators did not agree
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", nli_rows(3))
    task = tasks.get_task(name, path=tmp_path, num_dev=0, num_train=None)
    train = task.load("train")
    # every other row, named by its place in the file
    assert sorted(e.uid for e in train) == [f"train-{i}" for i in (0, 1, 3, 4, 5)]
    assert all(e.fields["premise"] != "Premise 2." for e in train)
    # the kept rows still name their own line in an error
    rows[4].pop("hypothesis")
    write_jsonl(tmp_path / "train.jsonl", rows)
    broken = tasks.get_task(name, path=tmp_path, num_dev=0, num_train=None)
    with pytest.raises(TaskError, match=r"train.jsonl:5 \(row 5\): field 'hypothesis'"):
        broken.load("train")


def test_csv_labels_of_minus_one_are_dropped_too(tmp_path):
    lines = ["premise,hypothesis,label", "A.,B.,0", "C.,D.,-1", "E.,F.,2"]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    task = tasks.get_task("snli", path=tmp_path, num_dev=0, num_train=None)
    assert sorted(e.uid for e in task.load("train")) == ["train-0", "train-2"]


@pytest.mark.parametrize(
    ("name", "own", "row"),
    [
        ("mnli", "validation_matched", {"premise": "P.", "hypothesis": "H.", "label": 1}),
        ("trec", "test", {"text": "Who is it ?", "coarse_label": 3}),
        ("sst5", "test", {"text": "fine .", "label": 2}),
        ("snli", "test", {"premise": "P.", "hypothesis": "H.", "label": 1}),
    ],
)
def test_test_is_drawn_from_the_datasets_own_split(tmp_path, monkeypatch, name, own, row):
    train = [row] * 4
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / f"{own}.jsonl", [row])
    if own == "test":  # a copy of the whole dataset: test wins over validation
        write_jsonl(tmp_path / "validation.jsonl", [row, row])
    assert len(tasks.get_task(name, path=tmp_path).load("test")) == 1
    assert (
        len(
            tasks.get_task(
                name, path={"train": tmp_path / "train.jsonl", own: tmp_path / f"{own}.jsonl"}
            ).load("test")
        )
        == 1
    )
    # the hub is asked for the dataset's own name
    asked = []

    def from_hub(hf_id, hf_config, split):
        asked.append((hf_id, hf_config, split))
        return None, "no hub in tests"

    monkeypatch.setattr(sources, "_hub_problem", lambda: None)
    monkeypatch.setattr(sources, "_from_hub", from_hub)
    with pytest.raises(TaskError, match="no hub in tests"):
        tasks.get_task(name).load("test")
    task = SUITE[name]
    assert asked == [(task.hf_id, task.hf_config, own)]


def test_save_to_disk_mnli_reads_validation_matched(tmp_path):
    import datasets

    rows = nli_rows(4)
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows),
            "validation_matched": datasets.Dataset.from_list(rows[:2]),
            "validation_mismatched": datasets.Dataset.from_list(rows[:3]),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    test = tasks.get_task("mnli", path=tmp_path / "saved").load("test")
    assert sorted(e.fields["premise"] for e in test) == ["Premise 0.", "Premise 1."]


def test_hub_ids_and_configs():
    expected = {
        "sst5": ("SetFit/sst5", None),
        "snli": ("stanfordnlp/snli", None),
        "mnli": ("nyu-mll/glue", "mnli"),
        "trec": ("CogComp/trec", None),
    }
    assert {name: (SUITE[name].hf_id, SUITE[name].hf_config) for name in NEW_TASKS} == expected
    assert set(NEW_TASKS) <= set(tasks.available_tasks())


# ---------------------------------------------------------------- training through the CLI

QUICK = [
    "train.progress=false",
    "train.steps=2",
    "train.batch_size=2",
    "train.save_every=0",
    "train.log_every=1",
    "task.fixtures=true",
    "task.max_length=128",
]


@pytest.fixture(scope="module")
def roberta_checkpoint(tmp_path_factory) -> Path:
    model, tokenizer = roberta_with_words(seed=1)
    directory = tmp_path_factory.mktemp("tiny-roberta-words")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def hand_accuracy(model, tokenizer, task, examples) -> float:
    right = 0
    for example in examples:
        form = task.masked_form(example)
        right += int(hand_scores(model, tokenizer, form.prompt, form.candidates).argmax()) == (
            example.label
        )
    return right / len(examples)


@pytest.mark.parametrize("family", ["roberta", "llama"])
@pytest.mark.parametrize("name", NEW_TASKS)
def test_new_tasks_train_two_steps_through_zo_train(tmp_path, roberta_checkpoint, family, name):
    model_name = str(roberta_checkpoint) if family == "roberta" else "tiny-llama"
    run = tmp_path / "run"
    args = [f"model.name={model_name}", f"task.name={name}", f"train.out={run}", *QUICK]
    assert main(["train", "--config", SMOKE, *args]) == 0
    steps = [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("type") == "step"] == [0, 1]
    summary = json.loads((run / "summary.json").read_text())
    # the zero-shot dev score is that of the untrained model in the family's own form
    model, tokenizer = models.load_model(model_name)
    task = fixture_task(name)
    dev = task.load("dev")
    if family == "roberta":
        expected = hand_accuracy(model, tokenizer, task, dev)
    else:
        expected = evaluate(model, tokenizer, task, dev, max_length=128)["score"]
    assert summary["zero_shot_score"] == pytest.approx(expected)
    assert summary["dev_examples"] == len(dev)
