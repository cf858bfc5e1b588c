"""The MeZO / ZO-Bench task suite against references, offline, from the shipped fixtures.

- rendered prompts equal a recording (tests/data/recorded_prompts.json), so a template
  cannot drift from the published protocol unnoticed; ZO_RECORD_PROMPTS=1 rewrites it;
- each task's loss reads exactly the tokens of its kind (every candidate, or the gold
  continuation only), and equals a naive full-logits computation;
- sampling is deterministic per seed and disjoint across splits;
- every source (JSONL, CSV, save_to_disk, a split mapping) gives the same examples, and a
  missing source or a bad row is an error that says where and what;
- every task evaluates on a tiny model of every family, equal to naive predictions;
- `zo eval` runs one task of each kind from the fixtures.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import socket
from pathlib import Path

import pytest
import torch

import tasks
from tasks.base import Example, TaskError
from tasks.encoding import bos_prefix, encode_rows, rows_of
from tasks.evaluation import evaluate, generate_answers, score_rows
from tasks.losses import batch_loss, make_batch
from tasks.metrics import score
from tasks.sampling import Sampling, permutation
from tasks.sources import FIXTURES_DIR
from tasks.suite import SUITE
from zo.models import FAMILIES, masked_byte_tokenizer, tiny_model

RECORDING = Path(__file__).parent / "data" / "recorded_prompts.json"
KINDS = {
    "classification": [
        *("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc"),
        *("sst5", "snli", "mnli", "trec"),  # MeZO's RoBERTa-large tasks (tests/test_roberta_tasks)
    ],
    "multiple_choice": ["copa", "record", "winogrande"],
    "generation": ["squad", "drop"],
}
METRIC_OF = {
    "multirc": "multirc_f1a",
    "record": "record_f1",
    "squad": "squad_f1",
    "drop": "drop_f1",
}
UNRECORDED = KINDS["classification"][-4:]
CAUSAL = [family for family in FAMILIES if family != "roberta"]
MAX_LENGTH = 256
NEW_TOKENS = 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and lose much on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a task tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def fixture_task(name: str, **options):
    return tasks.get_task(name, fixtures=True, **options)


def candidate_prompts(task, example: Example) -> list[str]:
    """The prompt each candidate is scored after: its own (partial scoring) or the task's."""
    own = getattr(task, "candidate_prompts", None)
    return own(example) if own else [task.prompt(example)] * len(task.candidates(example))


def rendered(task, example: Example) -> dict:
    shown = {"uid": example.uid, "prompt": task.prompt(example), "label": example.label}
    if task.kind == "generation":
        shown["answers"] = task.answers(example)
    else:
        shown["candidates"] = task.candidates(example)
    if hasattr(task, "candidate_prompts"):
        shown["candidate_prompts"] = task.candidate_prompts(example)
    return shown


def first_rows(task, count: int = 2) -> list[Example]:
    """The first rows of the validation fixture in file order (independent of sampling)."""
    rows = task.original_rows("validation")
    return [task.example(rows[i], uid=f"validation-{i}") for i in range(count)]


# ------------------------------------------------------------------------- the suite


def test_the_suite_is_registered_with_its_kinds_and_metrics():
    assert sorted(SUITE) == sorted(name for names in KINDS.values() for name in names)
    assert set(SUITE) <= set(tasks.available_tasks())
    for kind, names in KINDS.items():
        for name in names:
            task = fixture_task(name)
            assert task.kind == kind and task.objective == "loss"
            assert task.metric == METRIC_OF.get(name, "accuracy")
    squad = fixture_task("squad")
    with pytest.raises(TaskError, match="generation task; it has no candidates"):
        squad.candidates(squad.load("test")[0])


def test_rendered_prompts_equal_the_recording():
    current = {
        name: [rendered(task, e) for e in first_rows(task)]
        for name, task in ((name, fixture_task(name)) for name in SUITE)
    }
    if os.environ.get("ZO_RECORD_PROMPTS") == "1":
        RECORDING.parent.mkdir(exist_ok=True)
        RECORDING.write_text(json.dumps(current, indent=1, ensure_ascii=False) + "\n")
        pytest.skip("recorded the prompts; rerun without ZO_RECORD_PROMPTS")
    recorded = json.loads(RECORDING.read_text())
    # The tasks added with MeZO's RoBERTa set spell their prompts out in
    # tests/test_roberta_tasks.py; the recording keeps the original suite's unchanged.
    assert sorted(recorded) == sorted(set(current) - set(UNRECORDED))
    for name in recorded:
        assert current[name] == recorded[name], name


def test_prompts_follow_the_mezo_templates():
    """A few renderings spelled out, so the recording itself can be checked by eye."""
    sst2 = fixture_task("sst2")
    example = first_rows(sst2)[0]
    assert sst2.prompt(example) == "it 's a charming little story with a big heart It was"
    assert sst2.candidates(example) == [" terrible", " great"] and example.label == 1
    copa = first_rows(fixture_task("copa"), 4)
    assert fixture_task("copa").prompt(copa[0]) == "The candle burned out because"
    assert fixture_task("copa").candidates(copa[1]) == [
        " the glass shattered.",
        " the glass was filled.",
    ]
    wino = fixture_task("winogrande")
    last = first_rows(wino, 4)[3]
    assert wino.prompt(last) == "Rosa's garden grew better than"
    assert wino.candidate_prompts(last) == [
        "Rosa's garden grew better than Rosa",
        "Rosa's garden grew better than Ana",
    ]
    assert wino.candidates(last) == ["'s because Ana forgot to water hers."] * 2
    record = fixture_task("record")
    duplicated = first_rows(record)[1]  # "Sara Lind" twice among the entities
    assert record.candidates(duplicated)[0] == "Sara Lind brought the plane down safely."
    assert len(record.candidates(duplicated)) == 3 and "\n- Safe landing" in record.prompt(
        duplicated
    )


# ---------------------------------------------------------------------- loss and masks


def continuation_log_probs(model, tokenizer, prompt: str, continuation: str, room_for: int):
    """log P of each continuation token, from full logits of one unpadded sequence whose
    prompt is cut from the left to leave room for `room_for` continuation tokens."""
    bos = bos_prefix(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    room = MAX_LENGTH - len(bos) - room_for
    ids = bos + prompt_ids[max(0, len(prompt_ids) - room) :] + answer
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    first = len(ids) - len(answer)
    log_probs = logits[first - 1 : -1].log_softmax(-1)
    return log_probs[torch.arange(len(answer)), torch.tensor(answer)]


def scored_texts(tokenizer, batch) -> list[list[str]]:
    """Per (row, candidate) pair, the text of the tokens its loss reads."""
    pairs = batch.pairs
    return [
        [tokenizer.decode(pairs.target_ids[pairs.target_pair == p].tolist())]
        for p in range(pairs.num_pairs)
    ]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=1)


@pytest.mark.parametrize("name", list(SUITE))
def test_loss_reads_the_tokens_of_its_kind(llama, name):
    model, tokenizer = llama
    task = fixture_task(name)
    examples = task.load("train")[:2]
    batch = make_batch(tokenizer, task, examples, MAX_LENGTH, model=model)
    assert batch.kind == task.kind
    loss = float(batch_loss(model, batch))
    if task.kind == "classification":
        # every candidate of every example, each scored on its own tokens
        expected = [[c] for e in examples for c in task.candidates(e)]
        assert scored_texts(tokenizer, batch) == expected
        logits = []
        for example in examples:
            candidates = task.candidates(example)
            longest = max(
                len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in candidates
            )
            logits.append(
                torch.stack(
                    [
                        continuation_log_probs(
                            model, tokenizer, task.prompt(example), c, longest
                        ).mean()
                        for c in candidates
                    ]
                )
            )
        labels = torch.tensor([e.label for e in examples])
        reference = torch.nn.functional.cross_entropy(torch.stack(logits), labels)
    else:
        # teacher forcing: the gold continuation only, prompt and padding masked out
        gold = [
            task.answers(e)[0] if task.kind == "generation" else task.candidates(e)[e.label]
            for e in examples
        ]
        prompts = [
            task.prompt(e) if task.kind == "generation" else candidate_prompts(task, e)[e.label]
            for e in examples
        ]
        assert scored_texts(tokenizer, batch) == [[text] for text in gold]
        tokens = torch.cat(
            [
                continuation_log_probs(
                    model,
                    tokenizer,
                    prompt,
                    text,
                    len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                )
                for prompt, text in zip(prompts, gold, strict=True)
            ]
        )
        reference = -tokens.mean()
    assert loss == pytest.approx(float(reference), rel=1e-5, abs=1e-6)


# ------------------------------------------------------------- WinoGrande partial scoring


def winogrande_examples(task) -> list[Example]:
    """The fixture rows, plus one whose sentence starts with the blank."""
    first = task.example(
        {
            "sentence": "_ was too heavy for Ana to lift.",
            "option1": "Rosa",
            "option2": "The box",
            "answer": "2",
        },
        uid="blank-first",
    )
    return [*first_rows(task, len(task.original_rows("validation"))), first]


def continuation_sum(model, tokenizer, prompt: str, continuation: str) -> tuple[float, int]:
    """Naively: one unpadded forward over BOS + prompt + continuation, full logits; the
    summed log P of the continuation's tokens only, and how many there are."""
    prompt_ids = bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        log_probs = model(torch.tensor([prompt_ids + answer])).logits[0].float().log_softmax(-1)
    picked = [log_probs[len(prompt_ids) - 1 + j, t] for j, t in enumerate(answer)]
    return float(torch.stack(picked).sum()), len(answer)


def test_winogrande_scores_the_rest_of_the_sentence_after_each_option(llama):
    model, tokenizer = llama
    task = fixture_task("winogrande")
    examples = winogrande_examples(task)
    assert bos_prefix(tokenizer) == []  # no BOS: a prompt must never be empty
    assert task.prompt(examples[-1]) == ""
    assert task.candidate_prompts(examples[-1]) == ["Rosa", "The box"]
    rows = rows_of(task, examples)
    with torch.no_grad():
        batched = score_rows(
            model, tokenizer, rows, batch_size=4, max_length=MAX_LENGTH, normalize=False
        )
    naive = []
    for example, scores in zip(examples, batched, strict=True):
        before, after = example.fields["sentence"].strip().split("_")
        options = [example.fields["option1"], example.fields["option2"]]
        sums = [continuation_sum(model, tokenizer, before + o, after)[0] for o in options]
        torch.testing.assert_close(scores, torch.tensor(sums), atol=1e-4, rtol=0)
        naive.append(int(torch.tensor(sums).argmax()))
    # The scored tokens are the continuation's, for both options: never the option's own.
    batch = encode_rows(tokenizer, rows, MAX_LENGTH)
    for p in range(batch.num_pairs):
        row = rows[int(batch.example_index[p])]
        scored = batch.target_ids[batch.target_pair == p].tolist()
        assert scored == tokenizer(row.candidates[0], add_special_tokens=False)["input_ids"]
    # The same continuation after both options: the mean and the sum rank alike.
    result = evaluate(model, tokenizer, task, examples, batch_size=4, max_length=MAX_LENGTH)
    expected = sum(p == e.label for p, e in zip(naive, examples, strict=True)) / len(examples)
    assert result["accuracy"] == pytest.approx(expected)


def test_winogrande_trains_on_the_continuation_after_the_gold_option(llama):
    model, tokenizer = llama
    task = fixture_task("winogrande")
    examples = winogrande_examples(task)[-4:]
    batch = make_batch(tokenizer, task, examples, MAX_LENGTH, model=model)
    total, count = 0.0, 0
    for example in examples:
        before, after = example.fields["sentence"].strip().split("_")
        gold = example.fields[f"option{example.label + 1}"]
        summed, tokens = continuation_sum(model, tokenizer, before + gold, after)
        total, count = total + summed, count + tokens
    assert scored_texts(tokenizer, batch) == [[task.candidates(e)[0]] for e in examples]
    with torch.no_grad():
        loss = float(batch_loss(model, batch))
    assert loss == pytest.approx(-total / count, rel=1e-5)


def test_winogrande_on_a_masked_lm_or_calibrated_is_a_clear_error(roberta, llama):
    task = fixture_task("winogrande")
    model, tokenizer = roberta
    with pytest.raises(TaskError, match="prompt of its own.*use a causal LM"):
        make_batch(tokenizer, task, task.load("train")[:2], MAX_LENGTH, model=model)
    model, tokenizer = llama
    with pytest.raises(TaskError, match="partial scoring.*calibrate=False"):
        evaluate(model, tokenizer, task, task.load("test")[:2], calibrate=True)


# ----------------------------------------------------------------------------- sampling


def test_sampling_sizes_seeds_and_disjointness():
    sampling = Sampling(sample_seed=3)
    split = sampling.split_indices(3000, 2000)
    assert [len(split[s]) for s in ("train", "dev", "test")] == [1000, 500, 1000]
    assert not set(split["train"]) & set(split["dev"])
    assert set(split["train"]) | set(split["dev"]) <= set(range(3000))
    assert len(set(split["test"])) == 1000 and set(split["test"]) <= set(range(2000))
    assert Sampling(sample_seed=3).split_indices(3000, 2000) == split  # deterministic
    other = Sampling(sample_seed=4).split_indices(3000, 2000)
    assert other["train"] != split["train"] and other["test"] == split["test"]
    assert Sampling(test_seed=1).split_indices(3000, 2000)["test"] != split["test"]
    # a smaller train sample is a prefix of a larger one of the same seed
    small = Sampling(num_train=16, sample_seed=3).split_indices(3000, 2000)
    assert small["train"] == split["train"][:16]
    # small splits: dev takes at most half the training rows, train the rest
    tiny = Sampling().split_indices(7, 3)
    assert (len(tiny["train"]), len(tiny["dev"]), len(tiny["test"])) == (4, 3, 3)
    assert sorted(tiny["train"] + tiny["dev"]) == list(range(7))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sst2_rows(count: int, offset: int = 0) -> list[dict]:
    return [{"sentence": f"review {offset + i} ", "label": i % 2, "idx": i} for i in range(count)]


def test_a_task_samples_its_splits_by_seed(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", sst2_rows(40))
    write_jsonl(tmp_path / "validation.jsonl", sst2_rows(10, offset=100))
    options = {"path": tmp_path, "num_train": 10, "num_dev": 5, "num_test": 4}
    task = tasks.get_task("sst2", sample_seed=7, **options)
    loaded = {split: task.load(split) for split in ("train", "dev", "test")}
    assert [len(loaded[s]) for s in ("train", "dev", "test")] == [10, 5, 4]
    texts = {s: {e.fields["sentence"] for e in loaded[s]} for s in loaded}
    assert not texts["train"] & texts["dev"]
    assert all(int(t.split()[1]) >= 100 for t in texts["test"])  # test is the validation split
    expected = Sampling(10, 5, 4, sample_seed=7).split_indices(40, 10)
    for split, original in (("train", "train"), ("dev", "train"), ("test", "validation")):
        assert [e.uid for e in loaded[split]] == [f"{original}-{i}" for i in expected[split]]
    again = tasks.get_task("sst2", sample_seed=7, **options)
    assert [e.uid for e in again.load("train")] == [e.uid for e in loaded["train"]]
    reseeded = tasks.get_task("sst2", sample_seed=8, **options)
    assert [e.uid for e in reseeded.load("train")] != [e.uid for e in loaded["train"]]
    assert [e.uid for e in reseeded.load("test")] == [e.uid for e in loaded["test"]]


def test_k_shot_takes_the_first_k_of_each_label_in_seeded_order(tmp_path):
    rows = [{"sentence": f"review {i} ", "label": int(i % 4 == 0), "idx": i} for i in range(40)]
    write_jsonl(tmp_path / "train.jsonl", rows)  # 30 of label 0, 10 of label 1
    write_jsonl(tmp_path / "validation.jsonl", sst2_rows(10, offset=100))
    task = tasks.get_task("sst2", path=tmp_path, k_shot=6, sample_seed=3, num_test=4)
    train, dev, test = (task.load(split) for split in ("train", "dev", "test"))
    # the reference: walk the seeded order, fill train per label, then dev
    wanted: dict[str, list[str]] = {"train": [], "dev": []}
    for index in permutation(40, 3):
        label = rows[index]["label"]
        for split in ("train", "dev"):
            if sum(rows[int(u.split("-")[1])]["label"] == label for u in wanted[split]) < 6:
                wanted[split].append(f"train-{index}")
                break
    assert [e.uid for e in train] == wanted["train"] and [e.uid for e in dev] == wanted["dev"]
    assert sorted(e.label for e in train) == [0] * 6 + [1] * 6
    assert sorted(e.label for e in dev) == [0] * 6 + [1] * 4  # label 1 ran out (10 rows)
    assert len(test) == 4 and all(e.uid.startswith("validation-") for e in test)
    with pytest.raises(TaskError, match="k_shot .* needs a classification task"):
        tasks.get_task("copa", k_shot=4)
    with pytest.raises(TaskError, match="k_shot must be a whole number >= 1"):
        tasks.get_task("sst2", k_shot=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_train": -1}, "num_train must be >= 0"),
        ({"num_dev": "10"}, "num_dev must be a whole number"),
        ({"objective": "bleu"}, "objective 'bleu' is not one of"),
        ({"path": "x", "fixtures": True}, "give `path` or `fixtures: true`, not both"),
        ({"colour": "red"}, "its options are"),
    ],
)
def test_bad_suite_options_are_errors(options, message):
    with pytest.raises(TaskError, match=message):
        tasks.get_task("rte", **options)


# ------------------------------------------------------------------------------ sources


def fixture_rows(name: str, split: str) -> list[dict]:
    lines = (FIXTURES_DIR / name / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def same_examples(task, reference) -> None:
    for split in ("train", "dev", "test"):
        assert [rendered(task, e) for e in task.load(split)] == [
            rendered(reference, e) for e in reference.load(split)
        ], split


def write_csv(path: Path, rows: list[dict]) -> None:
    # Lists and objects go into a cell as JSON text, as a spreadsheet export would hold them.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()}
            )


@pytest.mark.parametrize("name", ["squad", "record", "multirc"])
def test_csv_directory_gives_the_fixture_examples(tmp_path, name):
    for split in ("train", "validation"):
        write_csv(tmp_path / f"{split}.csv", fixture_rows(name, split))
    same_examples(tasks.get_task(name, path=tmp_path), fixture_task(name))


def test_save_to_disk_directory_and_split_mapping(tmp_path):
    import datasets

    rows = {split: fixture_rows("copa", split) for split in ("train", "validation")}
    datasets.DatasetDict(
        {split: datasets.Dataset.from_list(r) for split, r in rows.items()}
    ).save_to_disk(str(tmp_path / "saved"))
    same_examples(tasks.get_task("copa", path=tmp_path / "saved"), fixture_task("copa"))
    files = {
        "train": write_jsonl(tmp_path / "a.jsonl", rows["train"]),
        "val": write_jsonl(tmp_path / "b.jsonl", rows["validation"]),  # SuperGLUE's name
    }
    same_examples(tasks.get_task("copa", path=files), fixture_task("copa"))
    write_jsonl(tmp_path / "glue" / "train.jsonl", rows["train"])
    write_jsonl(tmp_path / "glue" / "dev.jsonl", rows["validation"])  # GLUE-style name
    same_examples(tasks.get_task("copa", path=tmp_path / "glue"), fixture_task("copa"))


def test_no_source_says_where_to_put_which_files(tmp_path):
    with pytest.raises(TaskError) as error:
        tasks.get_task("rte", hub=False).load("train")
    message = str(error.value)
    for part in (
        "no data for the original 'train' split",
        "DIR/train.jsonl (or .csv",
        "fields premise, hypothesis, label",
        "aps/super_glue, rte",
        "save_to_disk",
        "fixtures: true",
    ):
        assert part in message, part
    with pytest.raises(TaskError, match="holds none of validation.jsonl, validation.csv"):
        write_jsonl(tmp_path / "train.jsonl", fixture_rows("rte", "train"))
        tasks.get_task("rte", path=tmp_path).load("test")
    with pytest.raises(TaskError, match="is not a directory"):
        tasks.get_task("rte", path=tmp_path / "train.jsonl").load("train")
    with pytest.raises(TaskError, match=r"maps \['dev'\]; add 'train'"):
        tasks.get_task("rte", path={"dev": tmp_path / "train.jsonl"}).load("train")


def bad_rows(tmp_path: Path, name: str, change) -> Path:
    rows = fixture_rows(name, "train")[:2]
    change(rows[1])
    write_jsonl(tmp_path / "train.jsonl", rows)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        (
            "rte",
            lambda row: row.pop("hypothesis"),
            r"train.jsonl:2 \(row 2\): field 'hypothesis' is missing",
        ),
        (
            "rte",
            lambda row: row.update(label=2),
            r"train.jsonl:2 \(row 2\): label 2 is not one of \[0, 1\]",
        ),
        ("sst2", lambda row: row.update(label=-1), "GLUE/SuperGLUE test splits have none"),
        ("cb", lambda row: row.update(label="maybe"), "label 'maybe' is not a whole number"),
        ("copa", lambda row: row.update(question="why"), "question 'why' is not one of"),
        ("record", lambda row: row.update(answers=["Lisbon"]), r"no answer \['Lisbon'\] is among"),
        ("winogrande", lambda row: row.update(sentence="A _ and _."), "one blank '_', it holds 2"),
        ("winogrande", lambda row: row.update(sentence="They met _ "), "nothing follows the blank"),
        (
            "squad",
            lambda row: row.update(answers={"text": []}),
            "answers.text has no non-empty text",
        ),
        ("drop", lambda row: row.update(answers_spans=["7"]), "must be an object with a 'spans'"),
    ],
)
def test_a_bad_row_is_named(tmp_path, name, change, message):
    path = bad_rows(tmp_path, name, change)
    task = tasks.get_task(name, path=path, num_dev=0)  # every row in train
    with pytest.raises(TaskError, match=message):
        task.load("train")


# ------------------------------------------------------------ evaluation on every family


def naive_prediction(model, tokenizer, task, example: Example) -> int:
    candidates = task.candidates(example)
    longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in candidates)
    scores = [
        continuation_log_probs(model, tokenizer, prompt, c, longest).mean()
        for prompt, c in zip(candidate_prompts(task, example), candidates, strict=True)
    ]
    return int(torch.stack(scores).argmax())


def naive_greedy_answer(model, tokenizer, prompt: str) -> str:
    ids = bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if token == tokenizer.eos_token_id or "\n" in text:
            break
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()


@functools.cache
def causal_model(family: str):
    return tiny_model(family, seed=5)


@pytest.mark.parametrize("name", list(SUITE))
@pytest.mark.parametrize("family", CAUSAL)
def test_every_task_evaluates_on_every_causal_family(family, name):
    model, tokenizer = causal_model(family)
    task = fixture_task(name, num_test=2)
    examples = task.load("test")
    result = evaluate(
        model,
        tokenizer,
        task,
        examples,
        batch_size=3,
        max_length=MAX_LENGTH,
        max_new_tokens=NEW_TOKENS,
    )
    if task.kind == "generation":
        predictions = [naive_greedy_answer(model, tokenizer, task.prompt(e)) for e in examples]
        from tasks.evaluation import EvalSettings
        from tasks.generation import GreedyConfig

        settings = EvalSettings(
            batch_size=3, max_length=MAX_LENGTH, greedy=GreedyConfig(max_new_tokens=NEW_TOKENS)
        )
        assert generate_answers(model, tokenizer, task, examples, settings) == predictions
    else:
        predictions = [naive_prediction(model, tokenizer, task, e) for e in examples]
    expected = score(task, examples, predictions)
    assert result["metric"] == task.metric
    assert result["score"] == pytest.approx(expected["score"])
    assert result["num_examples"] == len(examples)


def masked_words(task) -> tuple[str, ...]:
    """The words a masked LM reads at <mask>: the task's masked-LM verbalizer, if any."""
    return task.masked_verbalizer or task.verbalizer


@pytest.fixture(scope="module")
def roberta():
    """A tiny RoBERTa whose tokenizer knows each verbalizer word as one token, as the
    real RoBERTa vocabulary does (" great", "Yes", " No", ...)."""
    model, _ = tiny_model("roberta", seed=5)
    tokenizer = masked_byte_tokenizer()
    words = sorted({w for name in KINDS["classification"] for w in masked_words(SUITE[name])})
    tokenizer.add_tokens(words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


@pytest.mark.parametrize("name", KINDS["classification"])
def test_classification_tasks_evaluate_on_roberta_at_the_mask(roberta, name):
    model, tokenizer = roberta
    task = fixture_task(name, num_test=2)
    examples = task.load("test")
    words = [tokenizer.convert_tokens_to_ids(w) for w in masked_words(task)]
    predictions = []
    for example in examples:
        # LM-BFF's template with the mask inside where the task has one, else prompt + mask
        own = task.masked_form(example)
        text = own.prompt if own else task.prompt(example) + tokenizer.mask_token
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-(MAX_LENGTH - 2) :]
        sequence = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[
                0, sequence.index(tokenizer.mask_token_id)
            ]
        predictions.append(int(logits[words].argmax()))
    result = evaluate(model, tokenizer, task, examples, batch_size=3, max_length=MAX_LENGTH)
    assert result["score"] == pytest.approx(score(task, examples, predictions)["score"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("copa", "must be a single token"),
        ("squad", "cannot decode"),
        ("winogrande", "prompt of its own.*use a causal LM"),
    ],
)
def test_other_kinds_on_roberta_are_clear_errors(roberta, name, message):
    model, tokenizer = roberta
    task = fixture_task(name)
    with pytest.raises(TaskError, match=message):
        evaluate(model, tokenizer, task, task.load("test"), max_length=MAX_LENGTH)


# ----------------------------------------------------------------- custom tasks, config


def config_task(tmp_path: Path, task_yaml: str):
    from zo.config import load_config
    from zo.train import build_task

    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{name: tiny-llama}}\nestimator: {{name: zo_sgd}}\ntask:\n{task_yaml}")
    return build_task(load_config(path))


def test_custom_classification_and_generation_tasks_from_config(tmp_path):
    data = tmp_path / "topics"
    write_csv(
        data / "train.csv",
        [
            {"headline": "Cup final tonight", "topic": "sport"},
            {"headline": "Vote on the budget", "topic": "politics"},
        ],
    )
    task = config_task(
        tmp_path,
        (
            f'  name: jsonl\n  path: {data}\n  template: "{{headline}}\\nTopic:"\n'
            "  label: topic\n  verbalizer: {sport: ' sport', politics: ' politics'}\n"
        ),
    )
    examples = task.load("train")
    assert task.kind == "classification" and [e.label for e in examples] == [0, 1]
    assert task.prompt(examples[1]) == "Vote on the budget\nTopic:"
    assert task.candidates(examples[1]) == [" sport", " politics"]
    qa = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"q": "Capital of France?", "a": ["Paris", "paris"]},
            {"q": "Two plus two?", "a": "4"},
        ],
    )
    task = config_task(
        tmp_path, f'  name: jsonl\n  path: {qa}\n  template: "Q: {{q}}\\nA:"\n  target: a\n'
    )
    examples = task.load("train")
    assert task.kind == "generation" and task.metric == "squad_f1"
    assert task.prompt(examples[0]) == "Q: Capital of France?\nA:"
    assert task.answers(examples[0]) == [" Paris", " paris"] and task.answers(examples[1]) == [" 4"]


@pytest.mark.parametrize(
    ("rows", "options", "message"),
    [
        (
            [{"text": "a", "label": 0}, {"label": 1}],
            "verbalizer: {0: ' no', 1: ' yes'}",
            r"data.jsonl:2 \(row 2\): field 'text' is missing",
        ),
        (
            [{"text": "a", "label": 0}, {"text": "b", "label": 7}],
            "verbalizer: {0: ' no', 1: ' yes'}",
            r"data.jsonl:2 \(row 2\): label 7 is not in the verbalizer",
        ),
        (
            [{"text": "a", "answer": ""}],
            "target: answer",
            r"data.jsonl:1 \(row 1\): target 'answer' must be a non-empty string",
        ),
        ([], "verbalizer: {0: ' no', 1: ' yes'}", "data.jsonl is empty"),
    ],
)
def test_custom_task_data_errors_name_the_row(tmp_path, rows, options, message):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = config_task(
        tmp_path, f"  name: jsonl\n  path: {path}\n  template: '{{text}}'\n  {options}\n"
    )
    with pytest.raises(TaskError, match=message):
        task.load("train")


def test_custom_task_definition_errors_come_before_any_data(tmp_path):
    from zo.config import ConfigError

    with pytest.raises(ConfigError, match="give either `verbalizer`.*not both"):
        config_task(
            tmp_path,
            "  name: jsonl\n  path: x.jsonl\n  template: '{t}'\n"
            "  target: a\n  verbalizer: {0: ' a', 1: ' b'}\n",
        )
    with pytest.raises(ConfigError, match="has no \\{field\\} placeholder"):
        config_task(tmp_path, "  name: jsonl\n  path: x.jsonl\n  template: 'plain'\n  target: a\n")


# ---------------------------------------------------------------------------- zo eval


@pytest.mark.parametrize("name", ["sst2", "copa", "squad"])  # one task per kind
def test_zo_eval_runs_a_suite_task_from_the_fixtures(tmp_path, capsys, name):
    from zo.cli import main

    config = tmp_path / "eval.yaml"
    config.write_text(
        f"model: {{name: tiny-llama}}\ntask: {{name: {name}, max_length: {MAX_LENGTH}}}\n"
        "estimator: {name: zo_sgd}\ntrain: {eval_batch_size: 2}\n"
    )
    assert main(["eval", "--config", str(config), "task.fixtures=true", "task.eval_limit=2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, tokenizer = tiny_model("llama", seed=0)
    task = fixture_task(name)
    expected = evaluate(
        model, tokenizer, task, task.load("dev")[:2], batch_size=2, max_length=MAX_LENGTH
    )
    assert printed["task"] == name and printed["split"] == "dev"
    assert printed["metric"] == task.metric
    assert printed["score"] == pytest.approx(expected["score"])
