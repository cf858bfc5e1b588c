"""A frozen linear layer plus a trainable fp32 delta at fixed flat indices of its weight.

``SparseDeltaLinear(base, indices)`` computes ``base(x) + x @ D.T`` where ``D`` is zero except
``D.view(-1)[indices] = values``; ``D`` is never materialised. With ``rows, cols =
divmod(indices, in_features)`` the sparse part is ``out[..., rows[j]] += x[..., cols[j]] *
values[j]``: one gather of the input columns and one ``index_add`` over the output columns.
Against ``torch.sparse.mm`` at Llama-2-7B shapes, 0.1% density, 64 tokens, on this
project's shared 2-core CPU, gather + index_add took 19-25 / 25-34 / 50-63 ms for the
4096x4096 / 11008x4096 / 4096x11008 layers, a COO ``sparse.mm`` 9-28 / 32-36 / 23-113 ms
(noisy; a CSR tensor built per call was up to 330 ms): no clear winner on speed, and only
gather + index_add has forward-AD formulas and needs no sparse tensor rebuilt from the
perturbed values at every call, so ZO, forward-gradient and first-order all run through it.

The base may be any ``nn.Linear`` (fp32, bf16, ...) or a bitsandbytes ``Linear4bit``; it is
frozen and never perturbed: only ``values`` is a parameter. Under forward-mode AD a 4-bit
base runs ``F.linear(x, dequantize(W))`` (bitsandbytes' kernel drops tangents).

Embeddings are not supported: a mask naming an ``nn.Embedding`` weight (or a linear weight tied
to one, e.g. a tied ``lm_head``) is rejected with a clear error, because a delta on one use
of a tied weight would disagree with the merged checkpoint, where both uses change.

Mask files (written by :mod:`zo.masks`): safetensors mapping a weight name
(``model.layers.0.self_attn.q_proj.weight``) to sorted unique int32 flat indices into it.
Values files (:func:`save_values`): the same names mapping to the trained fp32 values.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from zo.config import ConfigError
from zo.sparse_chunks import backward_bytes_per_token, chunk_tokens, forward_bytes_per_token

VALUES_FORMAT = "zo-sparse-delta-values/1"
_VALUES_SUFFIX = ".values"
_WEIGHT_SUFFIX = ".weight"


class SparseDeltaError(ConfigError):
    """A mask or values file that does not fit the model (names, shapes, index ranges)."""


def _is_4bit(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(weight).__name__ == "Params4bit" or not (
        weight is None or weight.is_floating_point()
    )


def _carries_tangent(x: torch.Tensor) -> bool:
    """True for a forward-AD dual tensor or a ``torch.func`` transform's wrapper."""
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return True
    return fwAD.unpack_dual(x).tangent is not None


class SparseDeltaLinear(nn.Module):
    """``base(x) + x @ D.T`` with ``D.view(-1)[indices] = values``; only ``values`` trains."""

    def __init__(
        self, base: nn.Linear, indices: torch.Tensor, values: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        out_features, in_features = base.out_features, base.in_features
        indices = check_indices(indices, out_features * in_features, "indices")
        self.base = base
        self.base.requires_grad_(False)
        if _is_4bit(base):
            from zo.quant import fp32_4bit_kernels

            fp32_4bit_kernels(base)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("indices", indices)
        # int32 keeps the two index buffers at 8 bytes per entry; gather/index_add accept it.
        index_dtype = torch.int32 if out_features * in_features < 2**31 else torch.int64
        wide = indices.long()
        self.register_buffer("rows", (wide // in_features).to(index_dtype), persistent=False)
        self.register_buffer("cols", (wide % in_features).to(index_dtype), persistent=False)
        if values is None:
            values = torch.zeros(indices.numel(), dtype=torch.float32, device=indices.device)
        elif values.shape != (indices.numel(),):
            raise SparseDeltaError(
                f"values have shape {tuple(values.shape)}, the mask has {indices.numel()} indices"
            )
        self.values = nn.Parameter(values.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if _carries_tangent(x) or _carries_tangent(self.values):
            # forward-mode AD needs the differentiable composite (the whole block at once)
            return add_sparse_delta(x, out, self.values, self.rows, self.cols)
        if torch.is_grad_enabled() and (x.requires_grad or self.values.requires_grad):
            return _SparseDeltaAdd.apply(out, x, self.values, self.rows, self.cols)
        return _add_sparse_delta_in_chunks(x, out.contiguous(), self.values, self.rows, self.cols)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_4bit(self.base) and _carries_tangent(x):
            from zo.jvp import linear4bit_forward

            return linear4bit_forward(self.base, x)
        return self.base(x)

    @torch.no_grad()
    def dense_delta(self) -> torch.Tensor:
        """``D`` as a dense fp32 ``[out, in]`` tensor (for tests and merging small layers)."""
        delta = torch.zeros(self.out_features * self.in_features, device=self.values.device)
        delta[self.indices.long()] = self.values.float()
        return delta.view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        density = self.indices.numel() / (self.out_features * self.in_features)
        return f"k={self.indices.numel()}, density={density:.2e}"


def add_sparse_delta(
    x: torch.Tensor, out: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """``out + x @ D.T`` for ``D[rows[j], cols[j]] = values[j]``, differentiable (autograd
    and forward AD), the whole ``[tokens, k]`` gathered block at once."""
    picked = x.index_select(-1, cols).to(values.dtype) * values
    if out.dtype == values.dtype:
        return torch.index_add(out, -1, rows, picked)
    delta = torch.zeros(out.shape, dtype=values.dtype, device=out.device)
    # one rounding of the fp32 sum to the base's dtype, not one per term
    return delta.index_add_(-1, rows, picked).add_(out).to(out.dtype)


def _add_sparse_delta_in_chunks(
    x: torch.Tensor, out: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """:func:`add_sparse_delta` written into the (contiguous, fresh) ``out``, token chunk by
    token chunk, so the scratch stays under ``SPARSE_SCRATCH_BYTES`` whatever the batch.
    Per token the arithmetic is the same, so the result is bit-identical to one block."""
    flat_x = x.reshape(-1, x.shape[-1])
    flat_out = out.view(-1, out.shape[-1])
    per_token = forward_bytes_per_token(
        cols.numel(), out.shape[-1], x.element_size(), out.element_size()
    )
    chunk = chunk_tokens(per_token)
    for start in range(0, flat_x.shape[0], chunk):
        part = slice(start, start + chunk)
        flat_out[part] = add_sparse_delta(flat_x[part], flat_out[part], values, rows, cols)
    return out


class _SparseDeltaAdd(torch.autograd.Function):
    """Autograd for :func:`add_sparse_delta` that saves only the layer input and the values.

    The composite would save two ``[tokens, k]`` fp32 blocks per masked matrix (the gathered
    inputs for the values' gradient and the products for ``index_add``'s); at Llama-2-7B
    shapes that is several GiB for one step of LOMO. The backward re-gathers per token chunk.
    """

    @staticmethod
    def forward(ctx, out, x, values, rows, cols):
        ctx.save_for_backward(x, values, rows, cols)
        # a copy, not in place: the base's output may be a view made by its own Function
        result = out.clone(memory_format=torch.contiguous_format)
        return _add_sparse_delta_in_chunks(x, result, values, rows, cols)

    @staticmethod
    def backward(ctx, grad):
        x, values, rows, cols = ctx.saved_tensors
        _, needs_x, needs_values, _, _ = ctx.needs_input_grad
        flat_grad = grad.reshape(-1, grad.shape[-1])
        flat_x = x.reshape(-1, x.shape[-1])
        grad_x = torch.zeros(flat_x.shape, dtype=values.dtype, device=x.device) if needs_x else None
        grad_values = torch.zeros_like(values) if needs_values else None
        per_token = backward_bytes_per_token(values.numel(), x.element_size(), grad.element_size())
        chunk = chunk_tokens(per_token)
        for start in range(0, flat_x.shape[0], chunk):
            part = slice(start, start + chunk)
            picked_grad = flat_grad[part].index_select(-1, rows).to(values.dtype)
            if grad_values is not None:
                picked_x = flat_x[part].index_select(-1, cols).to(values.dtype)
                grad_values += (picked_grad * picked_x).sum(0)
            if grad_x is not None:
                grad_x[part].index_add_(-1, cols, picked_grad * values)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape).to(x.dtype)
        return grad, grad_x, grad_values, None, None


def check_indices(indices: torch.Tensor, numel: int, where: str) -> torch.Tensor:
    """Flat indices as a 1-D int32/int64 tensor, unique and inside ``[0, numel)``."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise SparseDeltaError(f"{where}: indices must be int32 or int64, got {indices.dtype}")
    indices = indices.reshape(-1)
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= numel:
            raise SparseDeltaError(
                f"{where}: flat indices span [{low}, {high}] but the weight has {numel} "
                "entries: the mask was made for a model of another shape"
            )
    if torch.unique(indices).numel() != indices.numel():
        raise SparseDeltaError(f"{where}: indices repeat; a mask holds each entry once")
    return indices


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _shared_weight_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _target_module(model: nn.Module, name: str, modules: Mapping[str, nn.Module]) -> nn.Linear:
    module_name = name.removesuffix(_WEIGHT_SUFFIX)
    module = modules.get(module_name) if name.endswith(_WEIGHT_SUFFIX) else None
    if module is None:
        examples = [n for n, m in modules.items() if isinstance(m, nn.Linear)][:3]
        raise SparseDeltaError(
            f"mask entry {name!r} names no weight of this model; Linear weights look like "
            f"{[e + _WEIGHT_SUFFIX for e in examples]}: was the mask made for another model?"
        )
    if isinstance(module, nn.Embedding):
        raise SparseDeltaError(
            f"mask entry {name!r} is an nn.Embedding weight; sparse deltas support nn.Linear "
            "weights only: make the mask without embeddings (or drop that entry)"
        )
    if not isinstance(module, nn.Linear):
        raise SparseDeltaError(
            f"mask entry {name!r} belongs to a {type(module).__name__}, not an nn.Linear "
            "(already wrapped, or not a linear layer); sparse deltas support nn.Linear only"
        )
    return module


def apply_sparse_deltas(
    model: nn.Module,
    indices: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor] | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """Swap each named linear for a :class:`SparseDeltaLinear`, in place; freeze the rest.

    ``indices`` maps weight names (``<module>.weight``) to flat indices; ``values`` (same
    names) sets starting deltas, zeros otherwise. Returns ``(<module>.values, parameter)``
    in the model's module order, which fixes the engine's tensor order.
    """
    modules = dict(model.named_modules())
    shared = _shared_weight_names(model)
    targets = {}
    for name in indices:
        module = _target_module(model, name, modules)
        uses = shared.get(id(module.weight), [name])
        if len(uses) > 1:
            raise SparseDeltaError(
                f"mask entry {name!r} is a weight tied to {[u for u in uses if u != name]}; "
                "a delta on one use would not match the merged model: untie the weights or "
                "make the mask without it"
            )
        numel = module.out_features * module.in_features
        check_indices(indices[name], numel, name)
        targets[name.removesuffix(_WEIGHT_SUFFIX)] = name
    if values is not None and set(values) != set(indices):
        raise SparseDeltaError(
            f"values and mask name different weights: only in values "
            f"{sorted(set(values) - set(indices))[:3]}, only in mask "
            f"{sorted(set(indices) - set(values))[:3]}"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = []
    for module_name in [n for n in modules if n in targets]:  # model order, not file order
        name = targets[module_name]
        base = modules[module_name]
        device = base.weight.device
        start = None if values is None else values[name].to(device)
        layer = SparseDeltaLinear(base, indices[name].to(device), start)
        parent, child = _parent(model, module_name)
        setattr(parent, child, layer)
        trainable.append((module_name + _VALUES_SUFFIX, layer.values))
    return trainable


def sparse_delta_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    """The model's sparse-delta layers by weight name (``<module>.weight``)."""
    return {
        name + _WEIGHT_SUFFIX: module
        for name, module in model.named_modules()
        if isinstance(module, SparseDeltaLinear)
    }


# ---------------------------------------------------------------------- files


def read_mask_indices(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A mask file's ``weight name -> flat indices`` (read by :func:`zo.masks.load_mask`)."""
    from zo.masks import MaskError, load_mask

    try:
        return load_mask(path)[0]
    except MaskError as error:
        raise SparseDeltaError(str(error)) from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def weight_name(name: str) -> str:
    """``<module>.values`` (a trainable-set name) -> ``<module>.weight`` (a mask name)."""
    if name.endswith(_VALUES_SUFFIX):
        return name.removesuffix(_VALUES_SUFFIX) + _WEIGHT_SUFFIX
    return name


def save_values(
    path: str | os.PathLike[str],
    named_values: Iterable[tuple[str, torch.Tensor]],
    mask_metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the trained values alone (keyed by weight name), atomically.

    ``mask_metadata`` (the mask file's) is copied in, so a values file says which mask it
    belongs to; merging checks names and lengths against the mask.
    """
    path = Path(path)
    tensors = {
        weight_name(name): v.detach().to("cpu", torch.float32).contiguous()
        for name, v in named_values
    }
    metadata = {str(k): str(v) for k, v in (mask_metadata or {}).items()}
    metadata["values_format"] = VALUES_FORMAT
    metadata[_VALUES_CHECK] = _values_digest(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_values(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A values file (or a run's ``trainable.safetensors``) as ``weight name -> values``,
    verified: against the checksum :func:`save_values` wrote into it, or the sha256 that the
    checkpoint's ``state.json`` beside it lists. A file with neither is read with a warning;
    an unreadable, changed or non-finite one is a :class:`SparseDeltaError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise SparseDeltaError(f"values file {path} does not exist")
    try:
        tensors = load_file(str(path))
        metadata = read_metadata(path)
    except Exception as error:  # safetensors raises its own error type or OSError
        raise SparseDeltaError(
            f"values file {path} is not a readable safetensors file ({error}): damaged?"
        ) from None
    _verify_values(path, tensors, metadata)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SparseDeltaError(
                f"values file {path}: {name} holds values that are not finite (nan or inf); "
                "merging them would break the model"
            )
    return {weight_name(name): tensor for name, tensor in tensors.items()}


_VALUES_CHECK = "values_sha256"


def _values_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _verify_values(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict) -> None:
    from zo.checkpoint import STATE, TRAINABLE, read_state
    from zo.run_files import RunDamagedError, sha256_of

    if _VALUES_CHECK in metadata:
        if _values_digest(tensors) != metadata[_VALUES_CHECK]:
            raise SparseDeltaError(
                f"values file {path}: its values differ from the checksum written with them "
                "(the file changed after it was saved): damaged"
            )
        return
    if path.name == TRAINABLE and (path.parent / STATE).is_file():
        try:
            files = read_state(path.parent).files or {}
        except RunDamagedError as error:
            raise SparseDeltaError(f"values file {path}: {error}") from None
        fd = os.open(path, os.O_RDONLY)
        try:
            actual = sha256_of(fd)
        finally:
            os.close(fd)
        if TRAINABLE in files:
            if files[TRAINABLE] != actual:
                raise SparseDeltaError(
                    f"values file {path}: its sha256 differs from the one in "
                    f"{path.parent / STATE} (the file changed after it was written): damaged"
                )
            return
    warnings.warn(
        f"values file {path} carries no checksum (not written by save_values or a zo "
        "checkpoint): merged unverified",
        UserWarning,
        stacklevel=3,
    )
