"""Rank-by-rank loading of a sharded run (zo.sharded_loading): built on the meta device, each
rank reading its rows of a safetensors checkpoint, against loading the whole model first."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from estimators.base import StepRecord
from estimators.zo_sgd import ZOSGD
from tests.sharded_worker import random_mask
from tests.test_cli import SMOKE, step_records, trained, zo
from tests.test_sharded import ROOT, expected_local_bytes, torchrun
from zo.config import ConfigError, TrainableConfig
from zo.engine import EngineConfig, seeded
from zo.masks import save_mask
from zo.models import load_model, model_fingerprint, tiny_model
from zo.sharded_loading import MetaCheckpoint, load_for_sharding
from zo.trainable import select_trainable

WORKER = str(ROOT / "tests" / "sharded_load_worker.py")
WHOLE_LOAD = str(ROOT / "tests" / "whole_load_train.py")


def saved_tiny(directory: Path, tied: bool = True) -> Path:
    model, tokenizer = tiny_model("llama")
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_two_ranks_load_their_rows_and_train_like_the_whole_load(tmp_path):
    directory = saved_tiny(tmp_path / "tiny")
    out = tmp_path / "out.safetensors"
    mask = saved_mask(directory, tmp_path / "mask.safetensors")
    result = torchrun(2, WORKER, str(out), str(directory), str(mask))
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(str(out), "pt") as saved:
        metadata = saved.metadata()
        tensors = {key: saved.get_tensor(key) for key in saved.keys()}  # noqa: SIM118
    # the header's fingerprint, streamed from the files, is the whole model's
    assert metadata["meta_fingerprint"] == metadata["whole_fingerprint"]
    # RoPE's buffers (not in the checkpoint) equal the whole load's, bit for bit
    buffers = [key.removeprefix("meta_buffer/") for key in tensors if key.startswith("meta_")]
    assert buffers
    for name in buffers:
        meta, whole = tensors[f"meta_buffer/{name}"], tensors[f"whole_buffer/{name}"]
        assert meta.dtype == whole.dtype and torch.equal(meta, whole), name
    # no parameter storage before the shards are allocated; then rank 0 holds its rows of
    # the blocks and the rest whole (the head tied to the embeddings: one storage), and read
    # exactly those bytes from the files
    assert metadata["tied"] == "True"
    assert int(metadata["bytes_before_fill"]) == 0
    assert int(metadata["bytes_after_fill"]) == expected_local_bytes(2)
    assert int(metadata["fill_read_bytes"]) == expected_local_bytes(2)
    names = [key.removeprefix("base/") for key in tensors if key.startswith("base/")]
    largest = max(tensors[f"base/{name}"].numel() * 4 for name in names)
    assert int(metadata["largest_read"]) <= largest  # the fingerprint streams one at a time
    # the three runs take the same steps to the same weights, bit for bit
    records = json.loads(metadata["meta_records"])
    assert records == json.loads(metadata["whole_records"]) == json.loads(metadata["plain_records"])
    for name in names:
        assert torch.equal(tensors[f"meta/{name}"], tensors[f"whole/{name}"]), name
        assert torch.equal(tensors[f"meta/{name}"], tensors[f"plain/{name}"]), name
        assert not torch.equal(tensors[f"meta/{name}"], tensors[f"base/{name}"]), name
    # one process replays the meta-loaded run to its weights
    model, _ = load_model(directory)
    replay = ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=3, engine=EngineConfig(threads=1))
    for record in records:
        replay.apply_record(StepRecord.from_dict(record))
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), tensors[f"meta/{name}"]), name
    # LoRA and a mask: the meta build allocates only the trainable set before the fill (the
    # adapters / deltas, made for real with the whole load's values), then trains the same
    for kind in ("lora", "mask"):
        assert metadata[f"{kind}/meta_fingerprint"] == metadata[f"{kind}/whole_fingerprint"]
        assert int(metadata[f"{kind}/bytes_before_fill"]) == int(
            metadata[f"{kind}/trainable_bytes"]
        )
        records = json.loads(metadata[f"{kind}/meta_records"])
        assert len(records) == 4 and records == json.loads(metadata[f"{kind}/whole_records"])
        names = [
            key.removeprefix(f"{kind}/meta/") for key in tensors if key.startswith(f"{kind}/meta/")
        ]
        assert any(("lora_B" if kind == "lora" else ".values") in name for name in names)
        for name in names:
            meta, whole = tensors[f"{kind}/meta/{name}"], tensors[f"{kind}/whole/{name}"]
            assert torch.equal(meta, whole), (kind, name)
        moved = [n for n in names if "lora_B" in n or n.endswith(".values")]
        assert all(tensors[f"{kind}/meta/{n}"].abs().sum() > 0 for n in moved)  # from zero


@pytest.mark.parametrize(("tied", "dtype"), [(False, None), (True, "bf16")])
def test_a_filled_meta_model_equals_the_whole_load(tmp_path, tied, dtype):
    directory = saved_tiny(tmp_path / "tiny", tied)
    whole, _ = load_model(directory, dtype=dtype)
    checkpoint = MetaCheckpoint(directory)
    model, _ = checkpoint.build(dtype, None)
    assert checkpoint.fingerprint(model) == model_fingerprint(whole)
    checkpoint.fill(model, torch.device("cpu"))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model_fingerprint(model) == model_fingerprint(whole)
    for name, buffer in whole.named_buffers():  # non-persistent: not in the fingerprint
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)


def saved_mask(directory: Path, path: Path) -> Path:
    """A mask file over ~5% of each block linear of the checkpoint's model."""
    model, _ = load_model(directory)
    return save_mask(path, random_mask(model), {})


def trainable_spec(kind: str, tmp_path: Path, directory: Path) -> TrainableConfig:
    if kind == "mask":
        return TrainableConfig(kind="mask", path=str(saved_mask(directory, tmp_path / "m")))
    return TrainableConfig(kind=kind)


@pytest.mark.parametrize("kind", ["lora", "mask"])
@pytest.mark.parametrize(("tied", "dtype"), [(False, None), (True, "bf16")])
def test_a_meta_model_takes_lora_and_masks_as_the_whole_load_does(tmp_path, kind, tied, dtype):
    directory = saved_tiny(tmp_path / "tiny", tied)
    spec = trainable_spec(kind, tmp_path, directory)
    whole, _ = load_model(directory, dtype=dtype)
    with seeded(5):  # LoRA's A matrices: drawn from this generator
        chosen = select_trainable(whole, spec)
    checkpoint = MetaCheckpoint(directory)
    model, _ = checkpoint.build(dtype, None)
    with seeded(5):
        meta_chosen = checkpoint.select(model, spec)
    assert meta_chosen.names == chosen.names and meta_chosen.manifest() == chosen.manifest()
    # the base stays on meta (nothing model-sized allocated), the trainable set is real
    assert all(p.is_meta for n, p in model.named_parameters() if n not in chosen.names)
    assert not any(p.is_meta for p in meta_chosen.params)
    assert [p.requires_grad for p in model.parameters()] == [
        p.requires_grad for p in whole.parameters()
    ]
    # the run header's fingerprint covers the adapters / mask indices: equal to the whole's
    assert checkpoint.fingerprint(model) == model_fingerprint(whole)
    checkpoint.fill(model, torch.device("cpu"))
    whole_state, state = whole.state_dict(), model.state_dict()
    assert list(state) == list(whole_state)
    for name, tensor in whole_state.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    for name, buffer in whole.named_buffers():  # non-persistent ones (a mask's rows, cols)
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    assert not any(torch.equal(p, torch.zeros_like(p)) for n, p in state.items() if "lora_A" in n)
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_a_refused_selection_on_a_meta_model_says_why_and_leaves_it_meta(tmp_path):
    checkpoint = MetaCheckpoint(saved_tiny(tmp_path / "tiny"))
    model, _ = checkpoint.build(None, None)
    with pytest.raises(ConfigError, match="trainable lora"):
        checkpoint.select(model, TrainableConfig(kind="lora", lora_targets=["absent_proj"]))
    assert all(p.is_meta for p in model.parameters())  # the stand-ins are gone


def config_for(model: str, trainable: str = "full") -> SimpleNamespace:
    """What zo.sharded_loading reads of a RunConfig."""
    return SimpleNamespace(
        model=SimpleNamespace(name=model, dtype=None), trainable=SimpleNamespace(kind=trainable)
    )


def test_what_loads_whole_says_so_once(tmp_path, capsys):
    directory = saved_tiny(tmp_path / "tiny")
    assert load_for_sharding(config_for("tiny-llama"), None) is None
    assert "'tiny-llama' is built in memory" in capsys.readouterr().err
    assert load_for_sharding(config_for(str(directory), "custom"), None) is None
    assert "trainable 'custom' is not known to select on a meta model" in capsys.readouterr().err
    # a checkpoint whose names are not the model's
    renamed = tmp_path / "renamed"
    saved_tiny(renamed)
    weights = load_file(str(renamed / "model.safetensors"))
    save_file({f"x.{k}": v for k, v in weights.items()}, str(renamed / "model.safetensors"))
    assert load_for_sharding(config_for(str(renamed)), None) is None
    assert "the checkpoint has no tensor" in capsys.readouterr().err
    for kind in ("full", "names", "lora", "mask"):
        model, _, checkpoint = load_for_sharding(config_for(str(directory), kind), None)
        assert next(model.parameters()).is_meta and checkpoint.directory == directory
        err = capsys.readouterr().err
        assert err.count("zo: sharded load") == 1 and "reads its rows" in err, kind


@pytest.mark.slow
def test_zo_train_fsdp_from_a_checkpoint_equals_data_parallel(tmp_path):
    directory = saved_tiny(tmp_path / "tiny")
    steps = ["train.steps=4", "train.progress=false", f"model.name={directory}"]
    runs = {name: tmp_path / name for name in ("fsdp", "data")}
    for name, out in runs.items():
        config = ["train", "--config", SMOKE, f"train.out={out}", f"train.parallel={name}"]
        result = torchrun(2, "-m", "zo.cli", *config, *steps)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("each rank reads its rows" in result.stderr) == (name == "fsdp")
    assert step_records(runs["fsdp"]) == step_records(runs["data"])
    for name, tensor in trained(runs["fsdp"]).items():
        assert torch.equal(tensor, trained(runs["data"])[name]), name
    headers = [
        json.loads((out / "trajectory.jsonl").read_text().splitlines()[0]) for out in runs.values()
    ]
    assert headers[0]["model_hash"] == headers[1]["model_hash"]
    assert zo("replay", str(runs["fsdp"]), "--out", str(tmp_path / "replayed")) == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "mask"])
def test_lora_and_mask_runs_read_their_rows_and_end_as_the_whole_load(tmp_path, kind):
    """`zo train` under torchrun, train.parallel=fsdp: each rank reads its rows, and the run
    takes the whole-load sharded run's steps to its adapters / deltas, bit for bit."""
    directory = saved_tiny(tmp_path / "tiny")
    trainable = "lora" if kind == "lora" else f"mask:{saved_mask(directory, tmp_path / 'm')}"
    steps = ["train.steps=3", "train.save_every=3", "train.log_every=1", "train.progress=false"]
    common = [f"model.name={directory}", "train.parallel=fsdp", f"trainable={trainable}"]
    runs = {"meta": ("-m", "zo.cli"), "whole": (WHOLE_LOAD,)}
    stderr = {}
    for name, launch in runs.items():
        out = tmp_path / name
        config = ["train", "--config", SMOKE, f"train.out={out}", *common, *steps]
        result = torchrun(2, *launch, *config)
        assert result.returncode == 0, result.stderr[-3000:]
        stderr[name] = result.stderr
    assert "each rank reads its rows" in stderr["meta"]
    assert "loads the whole model" not in stderr["meta"]
    assert "loads the whole model" in stderr["whole"]
    meta, whole = tmp_path / "meta", tmp_path / "whole"
    headers = [
        json.loads((out / "trajectory.jsonl").read_text().splitlines()[0]) for out in (meta, whole)
    ]
    assert headers[0]["model_hash"] == headers[1]["model_hash"]
    assert len(step_records(meta)) == 3 and step_records(meta) == step_records(whole)
    trained_meta, trained_whole = trained(meta), trained(whole)
    assert trained_meta.keys() == trained_whole.keys()
    assert any(("lora_" if kind == "lora" else ".values") in name for name in trained_meta)
    for name, tensor in trained_meta.items():
        assert torch.equal(tensor, trained_whole[name]), name
    assert any(tensor.abs().sum() > 0 for tensor in trained_meta.values())  # it trained
