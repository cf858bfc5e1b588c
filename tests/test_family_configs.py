"""The per-family experiment configs (experiments/<family>/*.yaml): every shipped YAML
validates, the published settings are what the papers state, and every family config trains
end to end through `zo train` on a tiny random model of its family, then replays bit for bit.

The configs name Hugging Face hub ids; there is no hub here, so the end-to-end runs point
`model.name` at a tiny checkpoint of the same family saved to a temporary directory, and a
hub id that cannot be fetched is checked through a `snapshot_download` that raises what
huggingface_hub raises offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hub_errors
from safetensors.torch import load_file

from zo import models, train
from zo.commands import USAGE_EXIT, main
from zo.commands.compare import method_configs
from zo.commands.validate import is_comparison, shipped_configs
from zo.config import ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
SMOKE = str(EXPERIMENTS / "tiny" / "smoke.yaml")

FAMILY_OF_DIRECTORY = {
    "opt": "opt",
    "roberta": "roberta",
    "llama2": "llama",
    "vicuna": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "llama3": "llama",
}
"""experiments/<directory>/ -> the zo.models family its hub checkpoints load as."""
REGISTERED_MODEL_DIRECTORIES = {"tiny", "smollm2"}
"""Configs of registered models (no hub id); other tests train them."""

FAMILY_CONFIGS = sorted(
    path for directory in FAMILY_OF_DIRECTORY for path in (EXPERIMENTS / directory).glob("*.yaml")
)

# Only what the papers state (the files' comments say which values are starting points).
PUBLISHED = {
    # MeZO (Malladi et al. 2023), OPT-13B: batch 16, eps 1e-3, lr in {1e-6, 1e-7}, 20k steps
    "opt/13b_mezo_sst2.yaml": {
        "estimator.name": "zo_sgd",
        "estimator.eps": 1e-3,
        "estimator.lr": {1e-6, 1e-7},
        "train.batch_size": 16,
        "train.steps": 20000,
        "trainable.kind": "full",
    },
    # MeZO (LoRA): eps 1e-2, lr in {1e-4, 5e-5}, rank 8, alpha 16
    "opt/13b_mezo_lora_sst2.yaml": {
        "estimator.eps": 1e-2,
        "estimator.lr": {1e-4, 5e-5},
        "train.batch_size": 16,
        "train.steps": 20000,
        "trainable.kind": "lora",
        "trainable.lora_r": 8,
        "trainable.lora_alpha": 16.0,
    },
    # MeZO, RoBERTa-large k = 16: batch 64, eps 1e-3, lr in {1e-7, 1e-6, 1e-5}, 100k steps
    "roberta/large_mezo_sst2_k16.yaml": {
        "estimator.name": "zo_sgd",
        "estimator.eps": 1e-3,
        "estimator.lr": {1e-7, 1e-6, 1e-5},
        "train.batch_size": 64,
        "train.steps": 100000,
        "task.options.k_shot": 16,
    },
    # SensZOQ: a 0.1% mask over a 4-bit base
    "llama2/7b_sparse_zo_nf4.yaml": {"model.quant": "nf4", "trainable.kind": "mask"},
}

QUICK = [
    "model.dtype=float32",
    "model.device=cpu",
    "task.fixtures=true",
    "task.max_length=64",
    "task.eval_limit=4",
    "train.steps=2",
    "train.batch_size=2",
    "train.eval_every=0",
    "train.save_every=0",
    "train.log_every=1",
    "train.eval_before=false",
    "train.progress=false",
]
"""What a quick run changes; everything else (estimator, lr, eps, trainable, task) is the
shipped config's."""


def relative(path: Path) -> str:
    return path.relative_to(EXPERIMENTS).as_posix()


def lookup(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


# ------------------------------------------------------------------------ what is shipped


def test_every_experiment_directory_is_a_known_family_or_registered_model():
    directories = {path.parent.name for path in shipped_configs(EXPERIMENTS)}
    assert directories == set(FAMILY_OF_DIRECTORY) | REGISTERED_MODEL_DIRECTORIES


def test_every_family_of_zo_has_configs():
    assert set(FAMILY_OF_DIRECTORY.values()) == set(models.FAMILIES)
    for directory in FAMILY_OF_DIRECTORY:
        assert list((EXPERIMENTS / directory).glob("*.yaml")), directory


@pytest.mark.parametrize("path", shipped_configs(EXPERIMENTS), ids=relative)
def test_every_shipped_config_parses_and_validates(path):
    configs = (
        [config for _, config in method_configs(str(path))]
        if is_comparison(path)
        else [load_config(path)]
    )
    for config in configs:
        models.check_model_name(config.model.name)  # registered, local or a hub id
        train.validate(config)  # no weights load, nothing downloads


@pytest.mark.parametrize("path", FAMILY_CONFIGS, ids=relative)
def test_family_configs_name_hub_models(path):
    name = load_config(path).model.name
    org, _, repo = name.partition("/")
    assert org and repo and "/" not in repo, name
    assert name not in models.available_models() and not Path(name).exists()
    models.check_model_name(name)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_settings_are_the_papers(name):
    resolved = to_dict(load_config(EXPERIMENTS / name))
    for key, expected in PUBLISHED[name].items():
        value = lookup(resolved, key)
        assert value in expected if isinstance(expected, set) else value == expected, key


# Where a config's step settings come from, in its header (issue 18: users must be able to
# tell a published setting from a tuned one or a guess).
PROVENANCE = ("from the paper", "the paper's", "tuned here", "starting point", "not tuned")


@pytest.mark.parametrize(
    "path", FAMILY_CONFIGS + sorted((EXPERIMENTS / "smollm2").glob("*.yaml")), ids=relative
)
def test_every_model_config_says_where_its_settings_come_from(path):
    header = " ".join(
        line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#")
    ).lower()
    assert any(words in header for words in PROVENANCE), (
        f"{relative(path)}: say whether lr/eps are the paper's, tuned here or a starting point"
    )


def test_sparse_zo_config_says_how_to_make_its_mask():
    path = EXPERIMENTS / "llama2" / "7b_sparse_zo_nf4.yaml"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    mask = load_config(path).trainable.path
    command = " ".join(line.lstrip("# ").rstrip("\\ ") for line in header)
    assert f"zo mask --model {load_config(path).model.name} --out {mask}" in command
    assert "--density 0.001" in command


# ------------------------------------------------------------------------ end to end


def scored_words(config_path: Path) -> list[str]:
    """Every candidate of the config's task on its fixture rows: a tiny masked LM needs each
    one as a single token, as RoBERTa's vocabulary has " great" and " terrible"."""
    task = train.build_task(load_config(config_path, QUICK))
    examples = [e for split in ("train", "dev", "test") for e in task.load(split)]
    masked_form = getattr(task, "masked_form", lambda example: None)
    words = set()
    for example in examples:
        form = masked_form(example)  # a masked LM reads the words of the masked form
        words.update(form.candidates if form is not None else task.candidates(example))
    return sorted(words)


def save_tiny_checkpoint(family: str, directory: Path, words: list[str] = ()) -> Path:
    model, tokenizer = models.tiny_model(family, seed=1)
    if words:
        tokenizer.add_tokens(list(words))
        with torch.random.fork_rng(devices=[]):  # resizing draws the new rows
            model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[Path, Path]:
    """Config path -> a tiny checkpoint directory of its family."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    found = {}
    for path in FAMILY_CONFIGS:
        family = FAMILY_OF_DIRECTORY[path.parent.name]
        words = scored_words(path) if family == "roberta" else []
        found[path] = save_tiny_checkpoint(family, root / relative(path).replace("/", "-"), words)
    return found


@pytest.fixture(scope="module")
def mask_of(checkpoints, tmp_path_factory):
    """A `zo mask` file for a checkpoint, made once per checkpoint."""
    made: dict[Path, Path] = {}

    def make(checkpoint: Path) -> Path:
        if checkpoint not in made:
            out = tmp_path_factory.mktemp("mask") / "mask.safetensors"
            args = ["mask", "--model", str(checkpoint), "--out", str(out), "--density", "0.01"]
            assert main([*args, "--tokens", "128", "--seq-len", "32", "--batch-size", "4"]) == 0
            made[checkpoint] = out
        return made[checkpoint]

    return make


def manifest_names(run: Path) -> list[str]:
    header = json.loads((run / "trajectory.jsonl").read_text().splitlines()[0])
    return [entry["name"] for entry in header["trainable"]]


def step_records(run: Path) -> list[dict]:
    lines = (run / "trajectory.jsonl").read_text().splitlines()[1:]
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("path", FAMILY_CONFIGS, ids=relative)
def test_family_config_trains_two_steps_and_replays(path, checkpoints, mask_of, tmp_path):
    checkpoint = checkpoints[path]
    overrides = [*QUICK, f"model.name={checkpoint}", f"train.out={tmp_path / 'run'}"]
    if load_config(path).trainable.kind == "mask":
        overrides.append(f"trainable.path={mask_of(checkpoint)}")
    if "k_shot" in load_config(path).task.options:  # the fixtures hold a few rows per label
        overrides.append("task.k_shot=1")
    run = tmp_path / "run"
    assert main(["train", "--config", str(path), *overrides]) == 0

    # the loop ran exactly the shipped config with the quick overrides
    expected = to_dict(load_config(path, overrides))
    assert to_dict(load_config(run / "config.yaml")) == expected
    records = step_records(run)
    assert [r["step"] for r in records] == [0, 1]
    assert all(r["lrs"][0] == expected["estimator"]["lr"] for r in records)

    # what trained is what the config's trainable set names, on the family's architecture
    names = manifest_names(run)
    reference, _ = models.load_model(checkpoint)
    family = models.get_family(FAMILY_OF_DIRECTORY[path.parent.name])
    assert isinstance(reference, models.family_model_class(family))
    kind = expected["trainable"]["kind"]
    if kind == "full":
        assert set(names) == {name for name, _ in reference.named_parameters()}
    elif kind == "lora":
        targets = tuple(expected["trainable"]["lora_targets"])
        assert names and all(
            ".lora_" in n and n.split(".lora_")[0].endswith(targets) for n in names
        )
    else:
        assert names and all(name.endswith(".values") for name in names)

    # the trajectory alone rebuilds the trained tensors, bit for bit
    assert main(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    replayed = load_file(str(tmp_path / "replayed" / "trainable.safetensors"))
    trained = load_file(str(run / "checkpoint" / "trainable.safetensors"))
    assert replayed.keys() == trained.keys()
    assert all(replayed[name].equal(trained[name]) for name in trained)


# ------------------------------------------------------------------------ hub ids in `zo train`


def offline(repo_id: str, **_: object) -> str:
    raise hub_errors.LocalEntryNotFoundError(
        "Cannot find an appropriate cached snapshot folder for the specified revision on the "
        "local disk and outgoing traffic has been disabled."
    )


def test_unknown_hub_id_offline_is_a_usage_error_with_the_fix(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    run = tmp_path / "run"
    args = ["train", "--config", SMOKE, "model.name=no-such-org/no-such-model", f"train.out={run}"]
    assert main([*args, "train.progress=false"]) == USAGE_EXIT
    message = capsys.readouterr().err
    assert "'no-such-org/no-such-model'" in message
    assert "not in the Hugging Face cache" in message and "hf download" in message
    assert "local" in message  # the other fix: pass a directory


def test_validation_accepts_hub_ids_without_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("validation must not download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    train.validate(load_config(SMOKE, ["model.name=facebook/opt-125m"]))
    with pytest.raises(ConfigError, match="model.name"):
        train.validate(load_config(SMOKE, ["model.name=not/a/hub/id"]))
