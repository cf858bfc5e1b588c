"""Loading a sharded run's model so that no rank holds the whole of it (issue 17).

For a local safetensors checkpoint (a Hugging Face directory, the bundled model's cache,
a hub snapshot) the model is built with its parameters on the meta device (buffers such as
RoPE's ``inv_freq`` are computed for real at construction: they are small and not in the
checkpoint), its trainable set is chosen there, its decoder blocks are sharded by
``fully_shard``, and only then are parameters allocated: each rank's rows of the block
tensors, read as slices of the safetensors files (``get_slice(name)[rows]``), and the
embeddings, norm and head whole. The run header's fingerprint streams the checkpoint one
tensor at a time (:func:`zo.models.streamed_fingerprint`): it equals the whole model's.

Every trainable kind (``full``, ``names``, ``lora``, ``mask``) loads this way. LoRA and a
mask make tensors of their own beside the base layers they wrap: peft's adapters (A drawn
from the run's trainable-init generator, B zeros, cast to the base weight's dtype) and a
sparse-delta layer's index buffers and zero deltas, each on its base weight's device. While
the trainable set is chosen (:meth:`MetaCheckpoint.select`) every meta parameter is a real
stand-in that holds one element (:func:`real_stand_ins`), so those tensors are made for real
on the host, by the same code in the same order, with the values a whole load gives them;
the base is meta again afterwards, under the names the wrapping gave it
(``q_proj.base_layer.weight``, ``q_proj.base.weight``), which :meth:`MetaCheckpoint.read`
maps to the files' keys. The adapters and deltas live in the decoder blocks and are sharded
with them, as in a whole load; the fill reads only the meta parameters and keeps theirs. A
mask file is computed beforehand by ``zo mask`` (which needs gradients, so the whole
model): training reads only its indices, never the weights.

Everything else loads whole and then shards, as before, and says so once: registered
in-memory models (the tiny ones), checkpoints whose names differ from the model's, and
trainable kinds registered elsewhere (not known to select correctly over a meta model).
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
from zo.trainable import TrainableSet, select_trainable

META_TRAINABLES = ("full", "names", "mask", "lora")


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

    def select(self, model: nn.Module, spec) -> TrainableSet:
        """:func:`zo.trainable.select_trainable` on the meta-built ``model``, with the values
        a whole load's selection gives.

        LoRA's adapters and a mask's index buffers and deltas are made for real, where the
        base layer's weight is (peft moves each adapter to its base weight's device and
        dtype): during the selection every meta parameter is a real stand-in holding one
        element (:func:`real_stand_ins`), so they land on the host, drawn from the same generator in the same order
        as over a loaded model. The base parameters are meta again afterwards, under the
        names the selection gave them (``q_proj.base_layer.weight``), and :meth:`read` finds
        them there."""
        before = model.state_dict(keep_vars=True).items()
        # by identity: the wrapping renames the base parameters but keeps them (the tensor is
        # held beside its key so that no id is reused meanwhile)
        key_of = {id(t): (t, self.keys[name]) for name, t in before if t.is_meta}
        with real_stand_ins(model):
            chosen = select_trainable(model, spec)
        keys = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.is_meta:
                if id(tensor) not in key_of:
                    raise RuntimeError(f"trainable {spec.kind!r} made {name} on the meta device")
                keys[name] = key_of[id(tensor)][1]
        self.keys = keys
        # the chosen tensors may have been stand-ins (full, names): take the model's own
        return TrainableSet(chosen.names, [model.get_parameter(n) for n in chosen.names])

    def fingerprint(self, model: nn.Module) -> str:
        """``model_fingerprint`` of the whole loaded model, streamed from the files."""
        return models.streamed_fingerprint(model, self.read)

    @torch.no_grad()
    def fill(self, model: nn.Module, device: torch.device) -> None:
        """Allocate this rank's parameters on ``device`` (the sharded blocks' rows, the rest
        whole) and read the meta ones from the files; buffers and the parameters that were
        already real (a trainable set's adapters or deltas) keep their values."""
        buffers = dict(model.named_buffers())
        real = {  # to_empty below empties every tensor, these too
            name: shard_offset(param)[0]
            for name, param in model.named_parameters()
            if not _is_meta(param)
        }
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
            if name in real:
                local.copy_(real[name])
                continue
            if local.numel() == 0:
                continue
            row = math.prod(param.shape[1:])  # elements per row (dim 0 is the sharded one)
            first = offset // row
            rows = slice(first, first + local.numel() // row) if param.dim() else None
            local.copy_(self.read(name, rows).reshape(-1))


def _is_meta(param: torch.Tensor) -> bool:
    """Whether a parameter (a DTensor: its local shard) has no storage yet."""
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.is_meta


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


@contextlib.contextmanager
def real_stand_ins(model: nn.Module) -> Iterator[None]:
    """Inside, each meta parameter of ``model`` is a real host tensor of its shape and dtype
    that holds one element (stride 0): code that reads a weight's device and dtype to make
    tensors beside it (peft's adapters, a mask's buffers) makes real ones, and nothing the
    size of the model is allocated. On exit the meta parameters are back in their modules,
    wherever the selection moved those (wrapped in a LoRA or sparse-delta layer), with the
    ``requires_grad`` the selection gave their stand-ins."""
    stand_ins: dict[int, nn.Parameter] = {}
    slots: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in stand_ins:  # tied weights share one stand-in
                    held = torch.zeros((), dtype=param.dtype).expand(param.shape)
                    stand_ins[id(param)] = nn.Parameter(held, param.requires_grad)
                slots.append((module, name, param))
    for module, name, param in slots:
        module._parameters[name] = stand_ins[id(param)]
    try:
        yield
    finally:  # also after a refused selection (its error is the one to see)
        for module, name, param in slots:
            stand_in = stand_ins[id(param)]
            if module._parameters.get(name) is stand_in:
                param.requires_grad_(stand_in.requires_grad)
                module._parameters[name] = param
    left = {id(p) for p in stand_ins.values()}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in left:  # moved to a new slot: it would be trained or hashed as zeros
            raise RuntimeError(f"{name} kept a stand-in of a meta parameter")


def meta_checkpoint(config) -> MetaCheckpoint | None:
    """The checkpoint a ``train.parallel=fsdp`` run can load rank by rank, or None (whole
    load, said once on rank 0's stderr with why)."""
    name = config.model.name
    reason = None
    if config.trainable.kind not in META_TRAINABLES:
        reason = f"trainable {config.trainable.kind!r} is not known to select on a meta model"
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
