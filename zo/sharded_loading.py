"""Loading a sharded run's model so that no rank holds the whole of it (issue 17).

For a local safetensors checkpoint (a Hugging Face directory, the bundled model's cache,
a hub snapshot) the model is built with its parameters on the meta device (buffers such as
RoPE's ``inv_freq`` are computed for real at construction: they are small and not in the
checkpoint), its trainable set is chosen there, its decoder blocks are sharded by
``fully_shard``, and only then are parameters allocated: each rank's rows of the block
tensors, read as slices of the safetensors files (``get_slice(name)[rows]``), and the
embeddings, norm and head whole. The run header's fingerprint streams the checkpoint one
tensor at a time (:func:`zo.models.streamed_fingerprint`): it equals the whole model's.

Everything else loads whole and then shards, as before, and says so once: registered
in-memory models (the tiny ones), checkpoints whose names differ from the model's, and
trainable sets that build tensors of their own on load (LoRA draws its A matrices from the
run's seed on the real device; a mask wraps layers around real index buffers).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from zo import models
from zo.sharded_optim import shard_offset

META_TRAINABLES = ("full", "names")


class MetaCheckpoint:
    """A safetensors checkpoint directory whose model is built on the meta device and filled
    rank by rank: :meth:`build`, then (trainable set chosen) :meth:`fingerprint`, sharding,
    and :meth:`fill`."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: dict[str, Path] = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), "pt") as opened:
                self.files |= dict.fromkeys(opened.keys(), file)
        self.keys: dict[str, str] = {}  # the model's state_dict name -> the file's key
        self.dtype = torch.float32

    def build(self, dtype: str | None, attn: str | None) -> tuple[nn.Module, object]:
        """The model with every parameter on the meta device, and its tokenizer; raises
        :class:`NotCovered` when the checkpoint's tensors are not the model's state."""
        import transformers

        model_class, attn = models.local_architecture(self.directory, attn)
        config = transformers.AutoConfig.from_pretrained(self.directory, local_files_only=True)
        self.dtype = models.resolve_dtype(dtype)
        settings = {"dtype": self.dtype, "attn_implementation": attn}
        with parameters_on_meta():
            if model_class is transformers.AutoModelForCausalLM:
                model = model_class.from_config(config, **settings)
            else:
                model = model_class._from_config(config, **settings)
        if (self.directory / "generation_config.json").is_file():
            model.generation_config = transformers.GenerationConfig.from_pretrained(
                self.directory, local_files_only=True
            )
        self.keys = self._checkpoint_keys(model)
        self._load_stored_buffers(model)
        return model.eval(), models.load_tokenizer(self.directory)

    @torch.no_grad()
    def _load_stored_buffers(self, model: nn.Module) -> None:
        """Persistent buffers the files hold take the files' values (as a whole load's do);
        the others keep the values computed at construction."""
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_meta and name in self.files:
                with safe_open(str(self.files[name]), "pt") as opened:
                    tensor.copy_(opened.get_tensor(name))

    def _checkpoint_keys(self, model: nn.Module) -> dict[str, str]:
        """Each meta state_dict entry's key in the files (a tied weight: under any of its
        names), checked against the files' shapes."""
        aliases: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        by_name: dict[str, list[str]] = {}
        for names in aliases.values():
            by_name |= dict.fromkeys(names, names)
        keys = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_meta:
                continue
            found = [key for key in by_name.get(name, [name]) if key in self.files]
            if not found:
                raise NotCovered(f"the checkpoint has no tensor {name}")
            with safe_open(str(self.files[found[0]]), "pt") as opened:
                shape = tuple(opened.get_slice(found[0]).get_shape())
            if shape != tuple(tensor.shape):
                raise NotCovered(f"{name} is {shape} in the checkpoint, {tuple(tensor.shape)} here")
            keys[name] = found[0]
        return keys

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The state_dict entry ``name`` (its ``rows`` only), in the model's dtype."""
        key = self.keys[name]
        with safe_open(str(self.files[key]), "pt") as opened:
            tensor = opened.get_slice(key)[rows] if rows is not None else opened.get_tensor(key)
        return tensor.to(self.dtype)

    def fingerprint(self, model: nn.Module) -> str:
        """``model_fingerprint`` of the whole loaded model, streamed from the files."""
        return models.streamed_fingerprint(model, self.read)

    @torch.no_grad()
    def fill(self, model: nn.Module, device: torch.device) -> None:
        """Allocate this rank's parameters on ``device`` (the sharded blocks' rows, the rest
        whole) and read them from the files; buffers keep their constructed values."""
        buffers = dict(model.named_buffers())
        tied: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            tied.setdefault(id(param), []).append(name)
        model.to_empty(device=device)  # new Parameter objects: ties are made again below
        for name, buffer in buffers.items():
            _set(model, "_buffers", name, buffer.to(device))
        for first, *others in tied.values():
            for name in others:
                _set(model, "_parameters", name, model.get_parameter(first))
        for name, param in model.named_parameters():
            local, offset = shard_offset(param)
            if local.numel() == 0:
                continue
            row = math.prod(param.shape[1:])  # elements per row (dim 0 is the sharded one)
            first = offset // row
            rows = slice(first, first + local.numel() // row) if param.dim() else None
            local.copy_(self.read(name, rows).reshape(-1))


def _set(model: nn.Module, kind: str, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    getattr(model.get_submodule(owner), kind)[leaf] = tensor


class NotCovered(Exception):
    """Why a model loads whole instead (logged once, never silently)."""


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside register their parameters on the meta device (their initial
    values are never computed); buffers are built for real, where they are made."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def meta_checkpoint(config) -> MetaCheckpoint | None:
    """The checkpoint a ``train.parallel=fsdp`` run can load rank by rank, or None (whole
    load, said once on rank 0's stderr with why)."""
    name = config.model.name
    reason = None
    if config.trainable.kind not in META_TRAINABLES:
        reason = f"trainable {config.trainable.kind!r} builds its tensors on the loaded model"
    elif models.is_registered_model(name) and (
        models.tiny_family_of(name) or models.get_model(name).traits.directory is None
    ):
        reason = f"model {name!r} is built in memory, not read from a checkpoint"
    checkpoint = None
    if reason is None:
        registered = models.is_registered_model(name)
        directory = models.get_model(name).traits.directory() if registered else None
        checkpoint = MetaCheckpoint(directory or models.checkpoint_path(name))
        if not checkpoint.files:
            reason, checkpoint = f"{checkpoint.directory} has no *.safetensors files", None
    if reason is not None:
        _say(f"sharded load of {name}: every rank loads the whole model, then shards ({reason})")
    return checkpoint


def load_for_sharding(config, attn: str | None):
    """``(model on the meta device, tokenizer, checkpoint)`` for a ``train.parallel=fsdp``
    run that loads rank by rank, or None (said once, with why) where it loads whole."""
    checkpoint = meta_checkpoint(config)
    if checkpoint is None:
        return None
    try:
        model, tokenizer = checkpoint.build(config.model.dtype, attn)
    except NotCovered as reason:
        _say(f"sharded load: every rank loads the whole model, then shards ({reason})")
        return None
    _say(f"sharded load of {config.model.name}: each rank reads its rows of {checkpoint.directory}")
    return model, tokenizer, checkpoint


def _say(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"zo: {message}", file=sys.stderr)
