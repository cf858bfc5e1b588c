"""``zo export``: a run directory -> what other tools load.

* ``full`` and ``names`` runs: a Hugging Face model directory (config, tokenizer, safetensors)
  with the trained tensors in the base weights, for ``AutoModelForCausalLM.from_pretrained``
  (``AutoModelForMaskedLM`` for masked LMs). Tied embeddings stay tied.
* ``lora`` runs: a PEFT adapter directory (``adapter_config.json``,
  ``adapter_model.safetensors`` under PEFT's own names, the tokenizer) for
  ``PeftModel.from_pretrained(base, DIR)``; with ``merge=True`` the adapter merged into the base,
  as a model directory.
* ``mask`` runs: the sparse values added into the base checkpoint shard by shard
  (:func:`zo.merge.merge_values`, what ``zo merge`` does).

The weights are written in the run's ``model.dtype``, the dtype the run computed in. A run
over a 4-bit base is merged into the full-precision base checkpoint it was quantized from,
never into a dequantized copy of the 4-bit weights. Nothing of the base directory but config,
tokenizer and generation files is carried over (no old shards, no bundled-model marker), and
the output appears at once (:mod:`zo.staging`). The adapter is written from a skeleton of the
base on the ``meta`` device, so exporting it loads no base weights.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zo import models
from zo.config import ConfigError, RunConfig, load_config
from zo.engine import seeded
from zo.merge import merge_values
from zo.run_checkpoint import check_base_model, check_tensors, open_run, read_checkpoint
from zo.sparse_delta import read_mask_indices, weight_name
from zo.staging import check_output, staged_directory

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Log = Callable[[str], None]


class ExportError(ConfigError):
    """A run that cannot be exported as asked (exit code 2)."""


def export_command(run_dir: str | os.PathLike[str], kind: str) -> str:
    """The ``zo export`` line for a finished run (printed by ``zo train``)."""
    run = str(run_dir).rstrip("/")
    line = f"zo export {shlex.quote(run)} --out {shlex.quote(run + '-export')}"
    return line + ("   # a PEFT adapter; add --merge for a merged model" if kind == "lora" else "")


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    merge: bool = False,
    *,
    overwrite: bool = False,
    log: Log = print,
) -> Path:
    """Export the run in ``run_dir`` to ``out_dir`` (see the module doc); returns ``out_dir``.

    ``merge``: LoRA runs only, the adapter merged into the base. ``overwrite``: replace a
    non-empty ``out_dir``. Everything is checked before a byte is written.
    """
    run = open_run(run_dir)
    config = load_config(run.config)
    kind = config.trainable.kind
    if merge and kind != "lora":
        raise ExportError(
            f"--merge merges a LoRA adapter into its base, but {run.path} trained "
            f"trainable.kind={kind}, whose export is already a full model: drop --merge"
        )
    out = Path(out_dir).expanduser()
    check_output(out, overwrite, protected=[run.path])
    check_base_model(run, config)
    checkpoint = read_checkpoint(run)
    base_dir = _base_directory(config.model.name)
    protected = [run.path, *([base_dir] if base_dir is not None else [])]
    if config.model.quant != "none" and not (kind == "lora" and not merge):
        log(
            f"note: the run trained over a {config.model.quant} (4-bit) base; the export merges "
            f"into the full-precision checkpoint of {config.model.name} (never a dequantized "
            "copy), so its logits differ from the run's by the 4-bit quantization error"
        )
    source = f"the checkpoint of {run.path} (step {checkpoint.step})"
    if kind == "mask":
        auto_class = _export_mask(config, checkpoint.tensors, source, out, overwrite, protected)
    elif kind == "lora" and not merge:
        auto_class = _export_adapter(config, checkpoint.tensors, source, out, overwrite, protected)
        _log_adapter_use(config, base_dir, auto_class, out, log)
        return out
    else:
        auto_class = _export_model(
            config, checkpoint.tensors, source, out, overwrite, protected, merge_lora=merge
        )
    log(
        f"exported {run.path} (trainable {kind}, step {checkpoint.step}) to {out}: a Hugging "
        f"Face model in {config.model.dtype}; load it with "
        f"transformers.{auto_class}.from_pretrained({str(out)!r})"
    )
    return out


# ---------------------------------------------------------------------- full, names, lora --merge


def _export_model(
    config: RunConfig,
    tensors: dict[str, torch.Tensor],
    source: str,
    out: Path,
    overwrite: bool,
    protected: list[Path],
    merge_lora: bool,
) -> str:
    """The base in full precision with the trained tensors in place (or the adapter merged)."""
    from zo.trainable import select_trainable

    model, tokenizer = models.load_model(config.model.name, dtype=config.model.dtype)
    if merge_lora:
        peft_model = _with_adapter(model, config)
        adapter = _adapter_parameters(peft_model)
        check_tensors(tensors, adapter, source, config, check_dtype=False)
        with torch.no_grad():
            for name, parameter in adapter.items():
                parameter.copy_(tensors[name])
        model = peft_model.merge_and_unload()
    else:
        trainable = select_trainable(model, config.trainable)
        expected = dict(zip(trainable.names, trainable.params, strict=True))
        check_tensors(tensors, expected, source, config)
        trainable.load_state_dict(tensors)
    with staged_directory(out, overwrite, protected) as staging, _quiet_transformers():
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return _auto_class(type(model))


# ---------------------------------------------------------------------- lora adapter


def _export_adapter(
    config: RunConfig,
    tensors: dict[str, torch.Tensor],
    source: str,
    out: Path,
    overwrite: bool,
    protected: list[Path],
) -> str:
    with _skeleton(config.model.name) as (skeleton, tokenizer):
        auto_class = _auto_class(type(skeleton))
        peft_model = _with_adapter(skeleton, config)
        adapter = _adapter_parameters(peft_model)
        check_tensors(tensors, adapter, source, config, check_dtype=False)
        # the run's names are the injected model's (peft_model.base_model.model) own names
        inner = peft_model.get_base_model()
        result = inner.load_state_dict({n: tensors[n] for n in adapter}, strict=False, assign=True)
        if result.unexpected_keys:  # check_tensors saw the same names: cannot happen
            raise ExportError(f"peft did not take the adapter tensors {result.unexpected_keys}")
        peft_model.peft_config["default"].base_model_name_or_path = _base_reference(
            config.model.name
        )
        with staged_directory(out, overwrite, protected) as staging:
            # save_embedding_layers=False: the base's embeddings are not trained; "auto"
            # would look the base model up on the hub
            peft_model.save_pretrained(str(staging), save_embedding_layers=False)
            tokenizer.save_pretrained(staging)
    return auto_class


def _with_adapter(model: PreTrainedModel, config: RunConfig) -> Any:
    """``model`` wrapped in a PeftModel with the run's LoRA config (as ``zo.trainable.add_lora``
    injects it), adapter initialised from a fixed seed (it is overwritten)."""
    from peft import get_peft_model

    from zo.trainable import lora_config

    spec = config.trainable
    task_type = "CAUSAL_LM" if _auto_class(type(model)) == "AutoModelForCausalLM" else None
    lora = lora_config(spec.lora_r, spec.lora_alpha, spec.lora_targets, task_type=task_type)
    device = next(model.parameters()).device
    with seeded(0, device if device.type != "meta" else None):
        return get_peft_model(model, lora)


def _adapter_parameters(peft_model: Any) -> dict[str, torch.nn.Parameter]:
    """The adapter's tensors under the names a run's checkpoint uses (the injected model's)."""
    return {
        name: parameter
        for name, parameter in peft_model.get_base_model().named_parameters()
        if "lora_" in name
    }


@contextlib.contextmanager
def _skeleton(name: str) -> Iterator[tuple[PreTrainedModel, Any]]:
    """The base model's architecture without its weights (``meta`` device) and its tokenizer;
    a registered in-memory model (the tiny ones) is small and built as it is."""
    import transformers

    directory = _base_directory(name)
    if directory is None:
        yield models.load_model(name)
        return
    model_class = models.architecture_for(directory)
    model_config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):  # the auto class
            model = model_class.from_config(model_config)
        else:
            model = model_class(model_config)
    yield model, models.load_tokenizer(directory)


def _log_adapter_use(
    config: RunConfig, base_dir: Path | None, auto_class: str, out: Path, log: Log
) -> None:
    base = _base_reference(config.model.name)
    log(
        f"exported the LoRA adapter of {config.model.name} to {out} (PEFT: adapter_config.json, "
        f"adapter_model.safetensors); load it with peft.PeftModel.from_pretrained("
        f"transformers.{auto_class}.from_pretrained({base!r}), {str(out)!r})"
    )
    if base_dir is None:
        log(
            f"note: the base {config.model.name!r} is a model registered in zo, not a "
            f"directory: build it with zo.models.load_model({config.model.name!r})"
        )
    if config.model.quant != "none":
        log(
            f"note: the run trained over a {config.model.quant} (4-bit) base: load the base "
            f"with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="
            f"{config.model.quant!r}) to compute what the run computed, or pass --merge for "
            "the adapter merged into the full-precision base"
        )


# ---------------------------------------------------------------------- mask


def _export_mask(
    config: RunConfig,
    tensors: dict[str, torch.Tensor],
    source: str,
    out: Path,
    overwrite: bool,
    protected: list[Path],
) -> str:
    """Values added into the base checkpoint shard by shard, as ``zo merge`` does."""
    indices = read_mask_indices(str(config.trainable.path))
    expected = {
        name.removesuffix(".weight") + ".values": torch.empty(idx.shape, dtype=torch.float32)
        for name, idx in indices.items()
    }
    check_tensors(tensors, expected, source, config)
    values = {weight_name(name): tensor for name, tensor in tensors.items()}
    dtype = models.resolve_dtype(config.model.dtype)
    with models.checkpoint_directory(config.model.name) as base_dir:
        merge_values(
            base_dir, indices, values, out, dtype=dtype, overwrite=overwrite, protected=protected
        )
        return _auto_class(models.architecture_for(base_dir))


# ---------------------------------------------------------------------- base models


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-shard progress bar from ``save_pretrained`` in a command's output."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _base_directory(name: str) -> Path | None:
    """The base checkpoint directory of a model name; None for a registered in-memory model."""
    if not models.is_registered_model(name):
        return models.checkpoint_path(name)
    if models.tiny_family_of(name) is not None:
        return None
    directory = models.get_model(name).traits.directory
    return directory() if directory is not None else None


def _base_reference(name: str) -> str:
    """What ``from_pretrained`` loads the base from: a hub id as it is, a directory's path."""
    directory = _base_directory(name)
    if directory is None:
        return name
    if (Path(name).expanduser() / "config.json").is_file() or name == models.BUNDLED_MODEL:
        return str(directory.resolve())
    return name  # a hub id: its cached snapshot is where from_pretrained finds it


def _auto_class(model_class: type) -> str:
    """The transformers auto class that loads an exported model of ``model_class``."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    name = model_class.__name__
    if name.startswith("AutoModel"):
        return name
    if name in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values():
        return "AutoModelForMaskedLM"
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "AutoModelForCausalLM"
    return "AutoModel"
