"""Your own data, as people have it (issue 15): one file with a held-out dev fraction, the
Hugging Face split names, and chat / instruction rows trained on the completion only. Each
shipped example config (experiments/tiny/own_data_*.yaml) trains through `zo train`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tasks
from tasks.base import TaskError
from tasks.chat import ChatTask
from tasks.files import split_files
from tasks.losses import batch_loss, make_batch
from zo.cli import main
from zo.models import byte_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "experiments" / "tiny"
OWN = ROOT / "experiments" / "data" / "own"
QUICK = ["train.progress=false", "train.save_every=0"]
TOPICS = {"sport": " sport", "politics": " politics", "weather": " weather"}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path: Path, lines: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def topics(path, **options) -> tasks.Task:
    return tasks.get_task(
        "jsonl", path=path, template="{text}\nTopic:", label="topic", verbalizer=TOPICS, **options
    )


def train(config: str, tmp_path: Path, *overrides: str, sgd_lr0: bool = False) -> Path:
    """Run a shipped config (its data path made absolute, so any working directory does);
    `sgd_lr0`: with plain SGD at lr 0, whose logged loss is that of the untrained model."""
    text = (TINY / config).read_text()
    path = next(line.split(":", 1)[1].strip().strip('"') for line in text.splitlines()
                if line.startswith("  path:"))  # fmt: skip
    if sgd_lr0:
        text = text.replace("zo_sgd", "sgd").replace("  lr: 1.0e-3\n  eps: 1.0e-3\n", "  lr: 0.0\n")
    copy = tmp_path / config
    copy.write_text(text)
    run = tmp_path / "run"
    args = ["train", "--config", str(copy), f"train.out={run}", f"task.path={ROOT / path}"]
    assert main([*args, *QUICK, *overrides]) == 0
    return run


# --------------------------------------------------------------------- dev_fraction


def test_dev_fraction_holds_out_a_seeded_stratified_share_of_one_file() -> None:
    task = topics(OWN / "topics.jsonl", dev_fraction=0.25)
    train_rows, dev = task.load("train"), task.load("dev")
    labels = Counter(row["topic"] for row in rows(OWN / "topics.jsonl"))
    assert labels == {"sport": 14, "politics": 14, "weather": 8}
    # a quarter of each label, rounded half up: 3.5 -> 4, 3.5 -> 4, 2
    assert Counter(e.fields["topic"] for e in dev) == {"sport": 4, "politics": 4, "weather": 2}
    assert len(train_rows) == 26
    assert {e.uid for e in train_rows}.isdisjoint({e.uid for e in dev})
    # both keep the file's order; the same seed holds out the same rows, another seed others
    assert [e.uid for e in dev] == sorted((e.uid for e in dev), key=lambda u: int(u.split("-")[1]))
    assert [e.uid for e in topics(OWN / "topics.jsonl", dev_fraction=0.25).load("dev")] == [
        e.uid for e in dev
    ]
    other = topics(OWN / "topics.jsonl", dev_fraction=0.25, split_seed=1).load("dev")
    assert {e.uid for e in other} != {e.uid for e in dev}
    assert Counter(e.fields["topic"] for e in other) == Counter(e.fields["topic"] for e in dev)


def test_dev_fraction_is_refused_beside_a_dev_file_naming_it(tmp_path: Path) -> None:
    data = [{"text": "a", "topic": "sport"}, {"text": "b", "topic": "weather"}]
    write(tmp_path / "train.jsonl", data)
    dev = write(tmp_path / "validation.jsonl", data)
    with pytest.raises(TaskError, match=f"dev split has a file of its own: {dev}"):
        topics(tmp_path, dev_fraction=0.5)
    with pytest.raises(TaskError, match="has a file of its own: .*d.jsonl"):
        topics({"train": tmp_path / "train.jsonl", "dev": tmp_path / "d.jsonl"}, dev_fraction=0.5)
    for bad in (0, 1, 1.5, True, "half"):
        with pytest.raises(TaskError, match="dev_fraction must be a number between 0 and 1"):
            topics(tmp_path / "train.jsonl", dev_fraction=bad)
    with pytest.raises(TaskError, match=r"leaves 2 for train and 0 for dev"):
        topics(tmp_path / "train.jsonl", dev_fraction=0.1).load("dev")
    # through the command: a usage error (exit 2) before any model loads
    config = TINY / "own_data_dev_fraction.yaml"
    args = [
        "train",
        "--config",
        str(config),
        f"train.out={tmp_path / 'run'}",
        f"task.path={tmp_path}",
    ]
    assert main(args) == 2
    assert not (tmp_path / "run").exists()


def test_dev_fraction_config_trains_and_evaluates_on_the_held_out_rows(tmp_path, capsys) -> None:
    run = train("own_data_dev_fraction.yaml", tmp_path, "train.steps=2")
    assert "zero-shot dev accuracy" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "accuracy"
    # the dev score is over the 10 held-out rows: a multiple of 1/10
    assert round(summary["final_score"] * 10, 6) == int(round(summary["final_score"] * 10))


# ------------------------------------------------------------- validation.jsonl, {split}


def test_validation_file_is_the_dev_split_in_every_path_form(tmp_path: Path) -> None:
    write(tmp_path / "train.jsonl", [{"text": "a", "topic": "sport"}])
    write(tmp_path / "validation.jsonl", [{"text": "b", "topic": "weather"}])
    assert split_files(tmp_path)["dev"] == tmp_path / "validation.jsonl"
    assert split_files(str(tmp_path / "{split}.jsonl"))["dev"] == tmp_path / "validation.jsonl"
    assert split_files({"train": "t.jsonl", "validation": "v.jsonl"}) == {
        "train": Path("t.jsonl"),
        "dev": Path("v.jsonl"),
    }
    assert [e.fields["text"] for e in topics(tmp_path).load("dev")] == ["b"]
    # dev.jsonl and validation.jsonl side by side: which is the dev split? refused
    write(tmp_path / "dev.jsonl", [{"text": "c", "topic": "sport"}])
    with pytest.raises(TaskError, match=r"dev split has two files, .*dev.jsonl and .*validation"):
        topics(tmp_path)
    with pytest.raises(TaskError, match="keep one"):
        split_files({"dev": "d.jsonl", "validation": "v.jsonl"})


def test_validation_config_reads_train_and_validation(tmp_path: Path) -> None:
    task = topics(OWN / "topics_hf")
    assert len(task.load("train")) == 27 and len(task.load("dev")) == 9
    run = train("own_data_validation.yaml", tmp_path, "train.steps=2")
    summary = json.loads((run / "summary.json").read_text())
    assert round(summary["final_score"] * 9, 6) == int(round(summary["final_score"] * 9))


# ------------------------------------------------------------------ chat, instruction

PLAIN_CHAT = [  # chat.jsonl's first two rows in the documented plain template
    ("system: Answer in one word.\nuser: Capital of France?\nassistant:", " Paris\n"),
    ("user: Capital of Italy?\nassistant:", " Rome\n"),
]


def reference_loss(model, tokenizer, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """The causal-LM loss with labels -100 on the prompt, written as with transformers:
    the completion's tokens only, pooled over the batch."""
    total, count = torch.zeros(()), 0
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + completion_ids])
        labels = torch.tensor([[-100] * len(prompt_ids) + completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        total += F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        count += len(completion_ids)
    return total / count


def unmasked_loss(model, tokenizer, pairs: list[tuple[str, str]]) -> torch.Tensor:
    texts = [tokenizer(p + c)["input_ids"] for p, c in pairs]
    with torch.no_grad():
        losses = [
            F.cross_entropy(
                model(input_ids=torch.tensor([t])).logits[0, :-1].float(),
                torch.tensor(t[1:]),
                reduction="sum",
            )
            for t in texts
        ]
    return sum(losses) / sum(len(t) - 1 for t in texts)


def test_chat_rows_train_on_the_completion_only() -> None:
    model, tokenizer = tiny_model("llama", seed=0, attn="eager")
    task = tasks.get_task("chat", path=str(OWN / "chat.jsonl"))
    examples = task.load("train")[:2]
    bound = task.for_tokenizer(tokenizer)  # no chat template: the plain one
    assert [(bound.prompt(e), bound.answers(e)[0]) for e in examples] == PLAIN_CHAT
    with torch.no_grad():
        loss = batch_loss(model, make_batch(tokenizer, task, examples, 96, model=model))
    expected = reference_loss(model, tokenizer, PLAIN_CHAT)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert abs(float(loss) - float(unmasked_loss(model, tokenizer, PLAIN_CHAT))) > 1e-3


def test_chat_rows_use_the_tokenizers_chat_template() -> None:
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    task = tasks.get_task("chat", path=str(OWN / "chat.jsonl"))
    example = task.load("train")[0]
    bound = task.for_tokenizer(tokenizer)
    assert (
        bound.prompt(example)
        == "<system>Answer in one word.\n<user>Capital of France?\n<assistant>"
    )
    assert bound.answers(example) == ["Paris\n"]  # the reply and what the template ends it with
    batch = make_batch(tokenizer, task, [example], 96).pairs
    assert batch.target_ids.tolist() == tokenizer("Paris\n", add_special_tokens=False)["input_ids"]
    # asked for the tokenizer's template where there is none, or rendering before binding
    strict = tasks.get_task("chat", path=str(OWN / "chat.jsonl"), chat_template="tokenizer")
    with pytest.raises(TaskError, match="has no chat template; use chat_template: plain"):
        strict.for_tokenizer(byte_tokenizer())
    with pytest.raises(TaskError, match="for_tokenizer"):
        task.prompt(example)
    assert isinstance(task, ChatTask) and task.for_tokenizer(tokenizer) is bound


def test_chat_rows_are_checked_with_their_place(tmp_path: Path) -> None:
    bad = [
        ({"messages": [{"role": "user", "content": "hi"}]}, "at least two"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "assistant's",
        ),
        (
            {"messages": [{"role": "boss", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "role among",
        ),
        ({"prompt": "a"}, "completion must both be text"),
        ({"text": "a"}, "expected JSONL or CSV rows with `messages`"),
    ]
    for row, message in bad:
        path = write(tmp_path / "train.jsonl", [row])
        with pytest.raises(TaskError, match=f"train.jsonl:1 .*{message}"):
            tasks.get_task("chat", path=str(path)).load("train")


def test_chat_config_trains_its_loss_on_the_completions(tmp_path: Path) -> None:
    # sgd with lr 0 on the whole training split in one batch: the logged loss is the loss of
    # the untrained tiny model, which the reference computes by hand (rows in any order)
    run = train(
        "own_data_chat.yaml", tmp_path, "train.steps=1", "train.batch_size=12",
        "train.log_every=1", "train.eval_before=false", sgd_lr0=True,
    )  # fmt: skip
    task = tasks.get_task("chat", path=str(OWN / "chat.jsonl"), dev_fraction=0.25)
    model, tokenizer = tiny_model("llama", seed=0, attn="eager")
    bound = task.for_tokenizer(tokenizer)
    pairs = [(bound.prompt(e), bound.answers(e)[0]) for e in task.load("train")]
    assert len(pairs) == 12 and len(task.load("dev")) == 4
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]  # step 1
    assert logged == pytest.approx(float(reference_loss(model, tokenizer, pairs)), rel=1e-5)


def test_instruction_config_trains_on_completions_and_reads_validation(tmp_path: Path) -> None:
    run = train(
        "own_data_instruction.yaml", tmp_path, "train.steps=1", "train.batch_size=12",
        "train.log_every=1", sgd_lr0=True,
    )  # fmt: skip
    pairs = [(r["prompt"], r["completion"]) for r in rows(OWN / "instruct_train.jsonl")]
    model, tokenizer = tiny_model("llama", seed=0, attn="eager")
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]  # step 1
    assert logged == pytest.approx(float(reference_loss(model, tokenizer, pairs)), rel=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "squad_f1"
    task = tasks.get_task("chat", path=str(OWN / "instruct_{split}.jsonl"))
    assert [e.answers[0] for e in task.load("dev")] == [
        r["completion"] for r in rows(OWN / "instruct_validation.jsonl")
    ]
