"""Masks: hook-based selections against dense references, mask files, calibration, `zo mask`."""

from __future__ import annotations

import json

import pytest
import torch

from zo import masks
from zo.calibration import CalibrationError, bundled_paths, read_texts, tokenize_chunks
from zo.commands import main
from zo.masks import (
    MaskError,
    budget,
    build_mask,
    compute_mask,
    load_mask,
    mask_targets,
    save_mask,
    validate_mask,
)
from zo.models import tiny_model

SEQ = 16


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def chunks(llama):
    _, tokenizer = llama
    return tokenize_chunks(read_texts(), tokenizer, SEQ, max_tokens=12 * SEQ)


def dense_scores(model, targets, batches) -> dict[str, torch.Tensor]:
    """The naive reference: full gradients per batch, squared, summed in batch order."""
    scores = {name: torch.zeros(p.numel()) for name, p in targets}
    for ids in batches:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in targets:
            scores[name] += p.grad.float().reshape(-1).square()
    model.zero_grad(set_to_none=True)
    return scores


def global_topk(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    flat = torch.cat(list(scores.values()))
    chosen = torch.topk(flat, k).indices
    result, offset = {}, 0
    for name, values in scores.items():
        mine = chosen[(chosen >= offset) & (chosen < offset + values.numel())] - offset
        if mine.numel():
            result[name] = mine.sort().values.to(torch.int32)
        offset += values.numel()
    return result


def per_matrix_topk(values: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    return {
        name: torch.topk(v, budget(density, v.numel())).indices.sort().values.to(torch.int32)
        for name, v in values.items()
    }


def assert_same_mask(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == torch.int32
        assert torch.equal(a[name], b[name]), name


# --- squared-gradient selections ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch_size", "pool_factor", "path"),
    [
        (12, 4, "one batch: pass 1 alone is exact"),
        (3, 1, "small pools: some matrices fall back to dense sums"),
        (3, 4, "default pools"),
        (3, 10_000, "pools hold every entry: every matrix certified"),
    ],
)
def test_sensitive_equals_dense_reference(llama, chunks, batch_size, pool_factor, path):
    model, tokenizer = llama
    density = 0.01
    result = build_mask(
        model,
        tokenizer,
        density=density,
        seq_len=SEQ,
        batch_size=batch_size,
        max_tokens=12 * SEQ,
        pool_factor=pool_factor,
    )
    targets = mask_targets(model)
    reference = dense_scores(model, targets, chunks.split(batch_size))
    total = sum(p.numel() for _, p in targets)
    assert_same_mask(result.indices, global_topk(reference, budget(density, total)))
    assert sum(t.numel() for t in result.indices.values()) == round(density * total)
    assert result.tokens == 12 * SEQ
    stats = result.stats
    assert stats.passes == (1 if batch_size == 12 else 2)
    if pool_factor == 1:  # both exact paths are exercised on this (deterministic) model
        assert 0 < stats.fallback_numel < total and 0 < stats.certified_matrices < len(targets)
    if pool_factor == 10_000:
        assert stats.fallback_numel == 0 and stats.certified_matrices == len(targets)


@pytest.mark.parametrize("batch_size", [3, 12])
def test_per_matrix_equals_dense_reference(llama, chunks, batch_size):
    model, tokenizer = llama
    indices = compute_mask(
        model,
        tokenizer,
        density=0.02,
        selection="per_matrix",
        seq_len=SEQ,
        batch_size=batch_size,
        max_tokens=12 * SEQ,
        pool_factor=1,
    )
    reference = dense_scores(model, mask_targets(model), chunks.split(batch_size))
    assert_same_mask(indices, per_matrix_topk(reference, 0.02))


def test_single_backward_running_topk_equals_full_gradient_topk(llama, chunks):
    """All tokens in one backward: the hooks' running top-k is the top-k of the full grad**2."""
    model, tokenizer = llama
    targets = mask_targets(model)
    model.zero_grad(set_to_none=True)
    model(input_ids=chunks, labels=chunks).loss.backward()
    full = {name: p.grad.float().reshape(-1).square() for name, p in targets}
    model.zero_grad(set_to_none=True)
    total = sum(v.numel() for v in full.values())
    for density in (0.001, 0.05, 1.0):
        indices = compute_mask(
            model,
            tokenizer,
            density=density,
            seq_len=SEQ,
            batch_size=len(chunks),
            max_tokens=chunks.numel(),
        )
        assert_same_mask(indices, global_topk(full, budget(density, total)))


def test_hooks_keep_at_most_one_gradient_and_restore_flags(llama, monkeypatch):
    model, tokenizer = llama
    params = list(model.parameters())
    params[0].requires_grad_(False)  # a flag the user set must come back as it was
    before = [p.requires_grad for p in params]
    alive_counts = []
    original = masks._squared_grad

    def counting(param):
        alive_counts.append(sum(p.grad is not None for p in params))
        return original(param)

    monkeypatch.setattr(masks, "_squared_grad", counting)
    compute_mask(model, tokenizer, density=0.01, seq_len=SEQ, batch_size=4, max_tokens=8 * SEQ)
    after = [p.requires_grad for p in params]
    params[0].requires_grad_(True)
    # 2 passes x 2 batches x 14 targets, and never a second gradient alive
    assert len(alive_counts) == 2 * 2 * 14 and max(alive_counts) == 1
    assert after == before
    assert all(p.grad is None for p in params)


# --- data-free selections -----------------------------------------------------------------------


def test_magnitude_is_per_matrix_top_abs(llama):
    model, _ = llama
    indices = compute_mask(model, selection="magnitude", density=0.03)
    weights = {name: p.detach().reshape(-1).abs() for name, p in mask_targets(model)}
    assert_same_mask(indices, per_matrix_topk(weights, 0.03))


def test_random_is_seeded_uniform_per_matrix(llama):
    model, _ = llama
    first = compute_mask(model, selection="random", density=0.05, seed=3)
    again = compute_mask(model, selection="random", density=0.05, seed=3)
    other = compute_mask(model, selection="random", density=0.05, seed=4)
    assert_same_mask(first, again)
    assert any(not torch.equal(first[n], other[n]) for n in first)
    for name, p in mask_targets(model):
        idx = first[name]
        assert idx.numel() == budget(0.05, p.numel())
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < p.numel()
    # the draw of one matrix does not depend on which other matrices are targeted
    name = next(iter(first))
    alone = compute_mask(model, selection="random", density=0.05, seed=3, targets=[name])
    assert torch.equal(alone[name], first[name])


def test_random_mask_of_a_4bit_model_equals_the_full_precision_one(tmp_path, llama):
    pytest.importorskip("bitsandbytes")
    from zo.quant import load_quantized

    model, _ = llama
    model.save_pretrained(tmp_path)
    quantized = load_quantized(tmp_path)
    expected = compute_mask(model, selection="random", density=0.03, seed=5)
    assert_same_mask(compute_mask(quantized, selection="random", density=0.03, seed=5), expected)
    with pytest.raises(MaskError, match="needs full-precision weights.*unquantized checkpoint"):
        compute_mask(quantized, selection="magnitude", density=0.03)


def test_random_covers_indices_uniformly():
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    for _ in range(2000):
        counts.index_add_(0, masks._uniform_subset(10, 3, generator), torch.ones(3))
    expected = 2000 * 3 / 10
    assert ((counts - expected).abs() < 0.1 * expected).all()


# --- targets and arguments ------------------------------------------------------------------------


def test_targets_are_block_linears_unless_embeddings_asked(llama):
    model, _ = llama
    names = [name for name, _ in mask_targets(model)]
    assert len(names) == 2 * 7  # q k v o gate up down per layer
    assert all(".layers." in n and n.endswith(".weight") for n in names)
    with_embeddings = [name for name, _ in mask_targets(model, include_embeddings=True)]
    assert with_embeddings[:-1] == names
    assert with_embeddings[-1] == "model.embed_tokens.weight"  # tied head: listed once


def test_opt_targets_and_sensitive_mask():
    model, tokenizer = tiny_model("opt", seed=1)
    names = [name for name, _ in mask_targets(model)]
    assert len(names) == 2 * 6  # q k v out fc1 fc2
    indices = compute_mask(model, tokenizer, density=0.01, seq_len=SEQ, max_tokens=4 * SEQ)
    validate_mask(indices, model)


@pytest.mark.parametrize(
    "options",
    [{"density": 0.0}, {"density": 1.5}, {"selection": "fisher"}, {"batch_size": 0}],
)
def test_bad_options_raise(llama, options):
    model, tokenizer = llama
    with pytest.raises(MaskError):
        compute_mask(model, tokenizer, **options)


# --- mask files -----------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, llama):
    model, _ = llama
    indices = compute_mask(model, selection="magnitude", density=0.01)
    meta = {"density": "0.01", "source": "bundled", "selection": "magnitude", "tokens": "0"}
    path = save_mask(tmp_path / "m.safetensors", indices, meta | {"model_id": "tiny-llama"})
    loaded, metadata = load_mask(path)
    assert_same_mask(loaded, indices)
    assert metadata == meta | {"model_id": "tiny-llama", "format_version": "1"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left


def test_load_errors(tmp_path):
    with pytest.raises(MaskError, match="does not exist"):
        load_mask(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MaskError, match="not a readable"):
        load_mask(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file(
        {"w": torch.zeros(2, dtype=torch.int32)},
        str(tmp_path / "v2.safetensors"),
        {"format_version": "2"},
    )
    with pytest.raises(MaskError, match="format_version"):
        load_mask(tmp_path / "v2.safetensors")


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.tensor([1, 5, 3], dtype=torch.int32), "sorted"),
        (torch.tensor([1, 1, 3], dtype=torch.int32), "unique"),
        (torch.tensor([-1, 3], dtype=torch.int32), r"\[0, 4096\)"),
        (torch.tensor([0, 4096], dtype=torch.int32), r"\[0, 4096\)"),
        (torch.tensor([0, 1], dtype=torch.int64), "int32"),
    ],
)
def test_validate_errors(llama, tensor, message):
    model, _ = llama
    name = "model.layers.0.self_attn.q_proj.weight"
    assert model.get_parameter(name).numel() == 4096
    with pytest.raises(MaskError, match=message):
        validate_mask({name: tensor}, model)


def test_validate_unknown_name_and_tied_alias(llama):
    model, _ = llama
    with pytest.raises(MaskError, match="not a parameter"):
        validate_mask(
            {"model.layers.9.mlp.up_proj.weight": torch.tensor([0], dtype=torch.int32)}, model
        )
    ok = torch.tensor([0, 7], dtype=torch.int32)
    validate_mask({"lm_head.weight": ok, "model.embed_tokens.weight": ok}, model)


# --- calibration ----------------------------------------------------------------------------------


def test_bundled_corpus_is_a_few_kb_of_text():
    paths = bundled_paths()
    size = sum(p.stat().st_size for p in paths)
    assert 2_000 < size < 50_000
    assert len(read_texts()) >= 10  # paragraphs are documents


def test_user_files_and_errors(tmp_path, llama):
    _, tokenizer = llama
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n  \nsecond doc\n")
    rows = [{"text": "third"}, {"text": ""}, {"text": "fourth"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts = read_texts([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert texts == ["first doc\nstill first", "second doc", "third", "fourth"]
    ids = tokenize_chunks(texts, tokenizer, 8)
    total = sum(len(t.encode()) + 1 for t in texts)  # one EOS after each document
    assert ids.shape == (total // 8, 8)
    assert ids[0].tolist() == tokenizer("first do", add_special_tokens=False).input_ids
    assert ids[2, 5].item() == tokenizer.eos_token_id  # "first doc\nstill first": 21 bytes
    assert tokenize_chunks(texts, tokenizer, 8, max_tokens=17).shape == (2, 8)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"txt": "y"}\n')
    (tmp_path / "data.csv").write_text("a,b\n")
    for name, message in [
        ("missing.txt", "does not exist"),
        ("empty.txt", "holds no text"),
        ("bad.jsonl", r"bad.jsonl:2"),
        ("data.csv", "unsupported type"),
    ]:
        with pytest.raises(CalibrationError, match=message):
            read_texts([tmp_path / name])
    with pytest.raises(CalibrationError, match="fewer than one chunk"):
        tokenize_chunks(["tiny"], tokenizer, 64)


# --- the command ----------------------------------------------------------------------------------


def zo_mask(*argv: str) -> int:
    return main(["mask", *argv])


def test_cli_usage_errors_return_2(tmp_path, capsys):
    out = str(tmp_path / "m.safetensors")
    (tmp_path / "taken.safetensors").write_bytes(b"")
    cases = [
        ("--model", "tiny-llama", "--out", out, "--density", "0"),
        ("--model", "tiny-llama", "--out", out, "--calibration", str(tmp_path / "no.txt")),
        ("--model", "tiny-llama", "--out", str(tmp_path / "taken.safetensors")),
        ("--model", "no-such-model", "--out", out),
        ("--model", "tiny-llama", "--out", out, "--batch-size", "0"),
    ]
    for argv in cases:
        assert zo_mask(*argv) == 2, argv
        assert "zo: error:" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_writes_a_valid_mask(tmp_path, capsys, llama):
    out = tmp_path / "sub" / "m.safetensors"
    argv = ["--model", "tiny-llama", "--out", str(out), "--density", "0.01", "--seq-len", "32"]
    assert zo_mask(*argv, "--tokens", "256", "--batch-size", "2") == 0
    assert "kept 737 of 73,728" in capsys.readouterr().out
    indices, metadata = load_mask(out)
    model, tokenizer = llama
    validate_mask(indices, model)
    assert {k: metadata[k] for k in ("density", "source", "selection", "tokens", "model_id")} == {
        "density": "0.01",
        "source": "bundled",
        "selection": "sensitive",
        "tokens": "256",
        "model_id": "tiny-llama",
    }
    expected = compute_mask(
        model, tokenizer, density=0.01, seq_len=32, batch_size=2, max_tokens=256
    )
    assert_same_mask(indices, expected)
    assert zo_mask(*argv) == 2  # exists now
    assert zo_mask(*argv, "--force", "--selection", "random") == 0
    assert load_mask(out)[1]["source"] == "none"
