"""`zo export`: every trainable kind becomes what transformers / peft load, computing what the
run computes. Each test trains a tiny run through `zo train`, exports it, loads the export with
transformers and peft alone, and compares logits with the run's own model (its config built
by `build_setup`, its checkpoint loaded): bit-identical where the arithmetic is the same (a
full or name-pattern run, a LoRA adapter), within 1e-5 where merging changes the arithmetic
(`(W + D) x` against `W x + D x`: same math, other rounding order)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file, save_file

from tasks.builtin import SENTIMENT_VERBALIZER
from tests.tiny import IDS
from zo.cli import main
from zo.config import load_config
from zo.export import export_run
from zo.masks import save_mask
from zo.models import tiny_model
from zo.run_directory import RunDirectory
from zo.train import build_setup

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")
QUICK = [
    "train.progress=false",
    "train.steps=2",
    "train.eval_before=false",
    "task.eval_limit=4",
    "model.device=cpu",  # the export is compared on the CPU
]
STALE = ("zo-bundled.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
OLD_SHARD = "model-00001-of-00002.safetensors"
MERGE_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
AUTO = {"llama": transformers.AutoModelForCausalLM, "roberta": transformers.AutoModelForMaskedLM}


def base_checkpoint(directory: Path, family: str) -> Path:
    """A tiny checkpoint directory with the litter real ones carry: the bundled model's marker,
    weights of another format and an old shard with its index."""
    model, tokenizer = tiny_model(family, seed=3)
    if family == "roberta":  # a masked LM scores one token at <mask>: the verbalizer's words
        tokenizer.add_tokens(list(SENTIMENT_VERBALIZER.values()))
        with torch.random.fork_rng(devices=[]):
            model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "zo-bundled.json").write_text("{}\n")
    (directory / "pytorch_model.bin").write_bytes(b"weights of another format")
    (directory / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}\n')
    save_file({"stale": torch.zeros(1)}, str(directory / OLD_SHARD))
    return directory


def random_mask(model_dir: Path, out: Path) -> Path:
    """1% of the entries of every attention/MLP linear weight, as a `zo mask` file."""
    weights = load_file(str(model_dir / "model.safetensors"))
    linear = ("q_proj", "v_proj", "down_proj", "query", "value", "output.dense")
    generator = torch.Generator().manual_seed(0)
    indices = {}
    for name, weight in weights.items():
        if name.endswith(".weight") and weight.dim() == 2 and any(k in name for k in linear):
            chosen = torch.randperm(weight.numel(), generator=generator)[: weight.numel() // 100]
            indices[name] = chosen.sort().values.to(torch.int32)
    return save_mask(out, indices, {"density": "0.01", "selection": "random"})


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {family: base_checkpoint(root / family, family) for family in ("llama", "roberta")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bases):
    """``runs(name, *overrides)``: a tiny run trained once per module."""
    root = tmp_path_factory.mktemp("runs")
    made: dict[str, Path] = {}

    def make(name: str, *overrides: str) -> Path:
        if name not in made:
            out = root / name
            args = ["train", "--config", SMOKE, f"train.out={out}", *QUICK, *overrides]
            assert main(args) == 0
            made[name] = out
        return made[name]

    return make


def run_model(run: Path, *overrides: str) -> torch.nn.Module:
    """The run's own model: its config through build_setup, its checkpoint loaded."""
    setup = build_setup(load_config(run / "config.yaml", list(overrides)))
    setup.trainable.load_state_dict(RunDirectory(run).load_checkpoint().tensors)
    return setup.model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def load_export(out: Path, family: str = "llama", like: torch.nn.Module | None = None):
    """The exported model through transformers alone, with the attention implementation of
    ``like`` (the run's model), so that the two compute with the same kernels."""
    attn = like.config._attn_implementation if like is not None else "eager"
    return AUTO[family].from_pretrained(out, attn_implementation=attn).eval()


def files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def assert_trained(exported: torch.nn.Module, base: Path, family: str = "llama") -> None:
    """The export is not the base: training moved the weights, and the export carries that."""
    assert not torch.equal(logits(exported), logits(load_export(base, family)))


# ---------------------------------------------------------------------- every kind


def test_full_run_exports_a_transformers_model_with_tied_embeddings(runs, tmp_path, capsys):
    run = runs("llama-full")
    out = export_run(run, tmp_path / "out")
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    reference = run_model(run)
    exported = load_export(out, like=reference)
    assert torch.equal(logits(exported), logits(reference))
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("great").input_ids == [4 + b for b in b"great"]  # the byte tokenizer
    assert not torch.equal(logits(exported), logits(tiny_model("llama")[0]))


def test_name_pattern_run_exports_its_base_directory_without_stale_files(runs, bases, tmp_path):
    base = bases["llama"]
    run = runs("llama-names", f"model.name={base}", "trainable=names:*norm*,*embed_tokens*")
    out = export_run(run, tmp_path / "out")
    reference = run_model(run)
    exported = load_export(out, like=reference)
    assert torch.equal(logits(exported), logits(reference))
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert not files(out) & {*STALE, OLD_SHARD}
    assert_trained(exported, base)


def test_lora_run_exports_a_peft_adapter(runs, bases, tmp_path):
    base = bases["llama"]
    run = runs("llama-lora", f"model.name={base}", "trainable.kind=lora", "trainable.lora_r=4")
    out = export_run(run, tmp_path / "out")
    assert files(out) >= {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 16.0, "LORA")
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["task_type"] == "CAUSAL_LM"
    names = load_file(str(out / "adapter_model.safetensors"))
    assert names and all(n.startswith("base_model.model.") and ".default." not in n for n in names)
    reference = run_model(run)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(
        config["base_model_name_or_path"], attn_implementation=reference.config._attn_implementation
    )
    adapted = PeftModel.from_pretrained(base_model, out).eval()
    assert torch.equal(logits(adapted), logits(reference))
    assert not torch.equal(logits(adapted), logits(load_export(base)))  # B moved off zero


def test_lora_run_with_merge_exports_the_merged_model(runs, bases, tmp_path):
    base = bases["llama"]
    run = runs("llama-lora", f"model.name={base}", "trainable.kind=lora", "trainable.lora_r=4")
    out = export_run(run, tmp_path / "out", merge=True)
    assert "adapter_config.json" not in files(out) and "model.safetensors" in files(out)
    assert not files(out) & {*STALE, OLD_SHARD}
    reference = run_model(run)
    exported = load_export(out, like=reference)
    assert not any("lora" in name for name, _ in exported.named_parameters())
    torch.testing.assert_close(logits(exported), logits(reference), **MERGE_TOLERANCE)
    assert_trained(exported, base)


def test_lora_over_a_registered_tiny_model(runs, tmp_path):
    run = runs("tiny-lora", "trainable.kind=lora", "trainable.lora_r=2")
    out = export_run(run, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "tiny-llama"
    )
    adapted = PeftModel.from_pretrained(tiny_model("llama")[0], out).eval()
    assert torch.equal(logits(adapted), logits(run_model(run)))


def test_mask_run_exports_the_merged_checkpoint(runs, bases, tmp_path):
    base = bases["llama"]
    mask = random_mask(base, tmp_path / "mask.safetensors")
    run = runs("llama-mask", f"model.name={base}", f"trainable=mask:{mask}")
    out = export_run(run, tmp_path / "out")
    assert not files(out) & {*STALE, OLD_SHARD}
    reference = run_model(run)
    exported = load_export(out, like=reference)
    torch.testing.assert_close(logits(exported), logits(reference), **MERGE_TOLERANCE)
    assert_trained(exported, base)
    # the same bytes as `zo merge` of the same base, mask and checkpoint
    values = run / "checkpoint" / "trainable.safetensors"
    merge = ["merge", "--model", str(base), "--mask", str(mask), "--values", str(values)]
    assert main([*merge, "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert merged.keys() == (exported_tensors := load_file(str(out / "model.safetensors"))).keys()
    assert all(torch.equal(merged[n], exported_tensors[n]) for n in merged)


@pytest.mark.parametrize("kind", ["full", "lora", "mask"])
def test_masked_lm_runs_export_for_the_masked_lm_auto_class(kind, runs, bases, tmp_path):
    base = bases["roberta"]
    trainable = {
        "full": ["trainable=full"],
        "lora": [
            "trainable.kind=lora",
            "trainable.lora_targets=[query,value]",
            "trainable.lora_r=2",
        ],
        "mask": [f"trainable=mask:{random_mask(base, tmp_path / 'mask.safetensors')}"],
    }[kind]
    run = runs(f"roberta-{kind}", f"model.name={base}", *trainable)
    out = export_run(run, tmp_path / "out")
    reference = run_model(run)
    if kind == "lora":
        base_model = transformers.AutoModelForMaskedLM.from_pretrained(
            base, attn_implementation=reference.config._attn_implementation
        )
        exported = PeftModel.from_pretrained(base_model, out).eval()
    else:
        exported = load_export(out, "roberta", like=reference)
    expected = logits(reference)
    if kind == "mask":
        torch.testing.assert_close(logits(exported), expected, **MERGE_TOLERANCE)
    else:
        assert torch.equal(logits(exported), expected)
    assert not torch.equal(logits(exported), logits(load_export(base, "roberta")))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mask", "names", "lora-merge"])
def test_runs_over_nf4_merge_into_the_full_precision_base(kind, runs, bases, tmp_path, capsys):
    """The export is the full-precision base plus the trained tensors: what the run's setup
    computes with model.quant=none, never a dequantized copy of the 4-bit weights."""
    base = bases["llama"]
    trainable = {
        "mask": f"trainable=mask:{random_mask(base, tmp_path / 'mask.safetensors')}",
        "names": "trainable=names:*norm*",
        "lora-merge": "trainable=lora",
    }[kind]
    run = runs(f"nf4-{kind}", f"model.name={base}", "model.quant=nf4", trainable)
    out = export_run(run, tmp_path / "out", merge=kind == "lora-merge")
    assert "full-precision checkpoint" in capsys.readouterr().out
    reference = run_model(run, "model.quant=none")
    exported = logits(load_export(out, like=reference))
    torch.testing.assert_close(exported, logits(reference), **MERGE_TOLERANCE)
    if kind == "names":
        assert torch.equal(exported, logits(reference))


# ---------------------------------------------------------------------- the command


def test_train_prints_the_export_command_and_the_command_exports(runs, tmp_path, capsys):
    out = tmp_path / "train"
    assert main(["train", "--config", SMOKE, f"train.out={out}", *QUICK]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("export:"))
    command = line.removeprefix("export:").split()
    assert command == ["zo", "export", str(out), "--out", f"{out}-export"]
    assert main(command[1:]) == 0
    reference = run_model(out)
    exported = load_export(Path(f"{out}-export"), like=reference)
    assert torch.equal(logits(exported), logits(reference))


def test_output_is_written_at_once_and_never_over_a_non_empty_directory(runs, tmp_path, capsys):
    run = runs("llama-full")
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    assert main(["export", str(run), "--out", str(out)]) == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no old copy
    umask = os.umask(0)
    os.umask(umask)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {0o666 & ~umask}  # safetensors alone would write the weights 0600


def test_a_failed_export_leaves_nothing_and_a_dead_staging_is_cleaned(runs, tmp_path, monkeypatch):
    run = runs("llama-full")
    out = tmp_path / "out"
    dead = tmp_path / f".out.staging-{socket.gethostname()}-999999999"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        export_run(run, out)
    assert list(tmp_path.iterdir()) == []  # neither --out nor any staging directory


def bare_run(tmp_path: Path, source: Path) -> Path:
    """A run directory holding a run's config and header, but no checkpoint yet."""
    run = tmp_path / "bare"
    run.mkdir()
    shutil.copy(source / "config.yaml", run / "config.yaml")
    header = (source / "trajectory.jsonl").read_text().splitlines()[0]
    (run / "trajectory.jsonl").write_text(header + "\n")
    return run


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not a run", "is not a zo run (no config.yaml"),
        ("no checkpoint", "has no checkpoint yet"),
        ("damaged", "checkpoint/trainable.safetensors"),
        ("merge", "--merge merges a LoRA adapter"),
        ("out holds the run", "which this command reads"),
        ("out is a file", "is a file"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(case, message, runs, tmp_path, capsys):
    run = runs("llama-full")
    out = tmp_path / "out"
    extra = []
    if case == "not a run":
        run = tmp_path
    elif case == "no checkpoint":
        run = bare_run(tmp_path, run)
    elif case == "damaged":
        damaged = tmp_path / "damaged"
        shutil.copytree(run, damaged)
        (damaged / "checkpoint" / "trainable.safetensors").write_bytes(b"not safetensors")
        run = damaged
    elif case == "merge":
        extra = ["--merge"]
    elif case == "out holds the run":
        out, extra = run.parent, ["--overwrite"]
    elif case == "out is a file":
        out.write_text("x")
    assert main(["export", str(run), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert case == "out is a file" or not out.exists() or out == run.parent
    assert (runs("llama-full") / "checkpoint" / "state.json").is_file()  # the run is intact
