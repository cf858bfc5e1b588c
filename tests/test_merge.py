"""Values files and merged checkpoints: the merged dense model computes the sparse model."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.tiny import IDS, fresh_tiny
from zo import merge
from zo.models import tiny_model
from zo.sparse_delta import apply_sparse_deltas, read_metadata, read_values, save_values
from zo.staging import OutputDirectoryError

ROOT = Path(__file__).resolve().parent.parent
MASKED = {
    "model.layers.0.self_attn.q_proj.weight": 64 * 64,
    "model.layers.0.mlp.down_proj.weight": 64 * 128,
    "model.layers.1.mlp.gate_proj.weight": 128 * 64,
}
METADATA = {
    "density": "0.05",
    "source": "test",
    "selection": "random",
    "tokens": "0",
    "model_id": "tiny-llama",
    "format_version": "1",
}


def make_mask(density: float = 0.05) -> dict[str, torch.Tensor]:
    mask = {}
    for i, (name, numel) in enumerate(MASKED.items()):
        generator = torch.Generator().manual_seed(i)
        mask[name] = torch.randperm(numel, generator=generator)[: int(numel * density)].sort()
        mask[name] = mask[name].values.to(torch.int32)
    return mask


@pytest.fixture
def files(tmp_path):
    """A saved tiny model, a mask, a sparse model with trained values and its values file."""
    model, tokenizer = fresh_tiny()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    mask = make_mask()
    save_file(mask, str(tmp_path / "mask.safetensors"), metadata=METADATA)
    named = apply_sparse_deltas(model, mask)
    with torch.no_grad():
        for i, (_, p) in enumerate(named):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)) * 0.05)
    save_values(tmp_path / "values.safetensors", named, METADATA)
    return tmp_path, model, named


def options(tmp_path, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    merge.add_arguments(parser)
    values = {
        "model": tmp_path / "base",
        "mask": tmp_path / "mask.safetensors",
        "values": tmp_path / "values.safetensors",
        "out": tmp_path / "merged",
    } | overrides
    argv = [item for key, value in values.items() for item in (f"--{key}", str(value))]
    return parser.parse_args(argv)


def test_values_file_holds_the_values_alone_keyed_by_weight_name(files):
    tmp_path, _, named = files
    stored = read_values(tmp_path / "values.safetensors")
    assert set(stored) == set(MASKED)
    for name, p in named:
        assert torch.equal(stored[name.removesuffix(".values") + ".weight"], p.detach())
    metadata = read_metadata(tmp_path / "values.safetensors")
    assert metadata["density"] == "0.05" and metadata["values_format"].startswith("zo-")


def test_merged_checkpoint_computes_what_the_sparse_model_computes(files):
    tmp_path, sparse_model, named = files
    assert merge.run(options(tmp_path)) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        expected = sparse_model(IDS).logits
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    # the touched weights are exactly W[idx] + values in fp32; the rest is the base
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    out = load_file(str(tmp_path / "merged" / "model.safetensors"))
    mask = make_mask()
    for name in base:
        expected = base[name].clone()
        if name in mask:
            values = dict(named)[name.removesuffix(".weight") + ".values"].detach()
            expected.view(-1)[mask[name].long()] += values
        assert torch.equal(out[name], expected), name
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp left


def test_values_from_a_run_checkpoint_merge_too(files):
    """A run saves its trainable set as ``<module>.values``; merge accepts those names."""
    tmp_path, _, named = files
    save_file({n: p.detach() for n, p in named}, str(tmp_path / "trainable.safetensors"))
    assert merge.run(options(tmp_path, values=tmp_path / "trainable.safetensors")) == 0
    a = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert merge.run(options(tmp_path, out=tmp_path / "again")) == 0
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_merging_into_a_wider_dtype_keeps_small_deltas(files):
    tmp_path, _, _ = files
    model, _ = tiny_model("llama", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    tiny = {name: torch.full((idx.numel(),), 1e-6) for name, idx in make_mask().items()}
    save_values(tmp_path / "tiny.safetensors", tiny.items(), METADATA)
    common = {"model": tmp_path / "bf16", "values": tmp_path / "tiny.safetensors"}
    assert merge.run(options(tmp_path, **common, out=tmp_path / "keep")) == 0
    assert merge.run(options(tmp_path, **common, out=tmp_path / "wide", dtype="float32")) == 0
    name = next(iter(MASKED))
    base = load_file(str(tmp_path / "bf16" / "model.safetensors"))[name]
    kept = load_file(str(tmp_path / "keep" / "model.safetensors"))[name]
    wide = load_file(str(tmp_path / "wide" / "model.safetensors"))[name]
    exact = base.float().view(-1).index_add(0, make_mask()[name].long(), tiny[name])
    exact = exact.view(base.shape)
    assert wide.dtype == torch.float32 and torch.equal(wide, exact)
    assert kept.dtype == torch.bfloat16 and torch.equal(kept, exact.bfloat16())  # one rounding
    assert (kept != base).sum() < (wide != base.float()).sum() / 2  # most deltas rounded away


def corrupt(tmp_path, kind: str) -> dict:
    mask = make_mask()
    name = next(iter(mask))
    values = read_values(tmp_path / "values.safetensors")
    if kind == "names":
        values["model.layers.1.mlp.up_proj.weight"] = values.pop(name)
    elif kind == "length":
        values[name] = torch.cat([values[name], torch.zeros(1)])
    elif kind == "range":
        mask[name] = torch.cat([mask[name][:-1], torch.tensor([64 * 64], dtype=torch.int32)])
    elif kind == "unknown-weight":
        mask["model.layers.9.mlp.up_proj.weight"] = mask.pop(name)
        values["model.layers.9.mlp.up_proj.weight"] = values.pop(name)
    save_file(mask, str(tmp_path / "bad-mask.safetensors"))
    save_file(values, str(tmp_path / "bad-values.safetensors"))
    return {
        "mask": tmp_path / "bad-mask.safetensors",
        "values": tmp_path / "bad-values.safetensors",
    }


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("names", "name different weights"),
        ("length", "values for"),
        ("range", "span"),
        ("unknown-weight", "not in"),
    ],
)
def test_mismatched_files_exit_2_and_write_nothing(files, capsys, kind, message):
    tmp_path, _, _ = files
    assert merge.run(options(tmp_path, **corrupt(tmp_path, kind))) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_an_existing_output_needs_overwrite(files, capsys):
    tmp_path, _, _ = files
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "old.txt").write_text("something else")  # an empty one is fine
    assert merge.run(options(tmp_path)) == 2
    assert "--overwrite" in capsys.readouterr().err
    args = options(tmp_path)
    args.overwrite = True
    assert merge.run(args) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "old.txt").exists()


def test_stale_files_of_the_base_are_not_copied(files):
    """The bundled model's marker, weights of another format and an old shard stay behind;
    the shards the index names are merged and the index copied."""
    tmp_path, _, _ = files
    base = tmp_path / "base"
    (base / "zo-bundled.json").write_text("{}")
    (base / "pytorch_model.bin").write_bytes(b"old")
    (base / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    old_index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(old_index))  # another sharding
    save_file({"stale": torch.zeros(1)}, str(base / "model-00001-of-00002.safetensors"))
    assert merge.run(options(tmp_path)) == 0
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(
        p.name
        for p in base.iterdir()
        if p.name
        not in {
            "zo-bundled.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
        }
    )


def test_a_directory_without_a_checkpoint_exits_2(files, capsys):
    tmp_path, _, _ = files
    assert merge.run(options(tmp_path, model=tmp_path / "nothing")) == 2
    assert "config.json" in capsys.readouterr().err


KILLED_MERGE = """
import os, signal, sys
import zo.merge as merge
when, *paths = sys.argv[1:]
if when == "writing":
    merge._merge_shard = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
else:  # between moving the old --out aside and moving the new one in
    replace = os.replace
    def replace_then_die(source, target):
        replace(source, target)
        if ".old-" in str(target):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die
merge.merge(*paths, overwrite=True)
"""


@pytest.mark.parametrize("when", ["writing", "swapping"])
def test_the_next_merge_cleans_up_after_a_killed_one(files, when):
    tmp_path, _, _ = files
    out = tmp_path / "merged"
    paths = [tmp_path / "base", tmp_path / "mask.safetensors", tmp_path / "values.safetensors"]
    merge.merge(*paths, out)  # what --overwrite then replaces
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    command = [sys.executable, "-c", KILLED_MERGE, when, *map(str, [*paths, out])]
    assert subprocess.run(command, cwd=ROOT).returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".merged.*"))  # what the kill left behind
    assert out.exists() == (when == "writing")
    # the killed --overwrite is undone: the old checkpoint is back, so this one refuses
    with pytest.raises(OutputDirectoryError, match="already exists"):
        merge.merge(*paths, out)
    assert not list(tmp_path.glob(".merged.*"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_sharded_base_merges_shard_by_shard(files):
    """The shards its index names are merged, one at a time, and the index copied."""
    tmp_path, sparse_model, _ = files
    model, tokenizer = fresh_tiny()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "sharded")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    assert merge.run(options(tmp_path, model=tmp_path / "sharded")) == 0
    merged_dir = tmp_path / "merged"
    assert sorted(p.name for p in merged_dir.glob("*.safetensors")) == shards
    assert (merged_dir / "model.safetensors.index.json").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        merged_dir, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(IDS).logits, sparse_model(IDS).logits, rtol=1e-5, atol=1e-5
        )
