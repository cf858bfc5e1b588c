"""Which tensors train: the estimator sees exactly these, in a stable order."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zo.config import DEFAULT_LORA_TARGETS, ConfigError, TrainableConfig
from zo.sparse_delta import apply_sparse_deltas, read_mask_indices

if TYPE_CHECKING:
    from peft import LoraConfig


@dataclass(frozen=True)
class TrainableSet:
    """Named trainable tensors in engine order; the order is part of every seed address."""

    names: list[str]
    params: list[nn.Parameter]

    def manifest(self) -> list[dict]:
        return [
            {"name": name, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
            for name, p in zip(self.names, self.params, strict=True)
        ]

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in zip(self.names, self.params, strict=True)}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(tensors))
        if missing:
            raise ValueError(f"checkpoint lacks trainable tensors {missing[:5]}")
        for name, p in zip(self.names, self.params, strict=True):
            if tensors[name].shape != p.shape or tensors[name].dtype != p.dtype:
                raise ValueError(
                    f"checkpoint tensor {name} is {tuple(tensors[name].shape)} "
                    f"{tensors[name].dtype}, the model has {tuple(p.shape)} {p.dtype}"
                )
            p.copy_(tensors[name])


Selector = Callable[[nn.Module, TrainableConfig], list[tuple[str, nn.Parameter]]]

SELECTORS: dict[str, Selector] = {}
"""Trainable-set kinds by name; each picks ``(name, tensor)`` pairs and may rewrap layers."""


def register_selector(kind: str) -> Callable[[Selector], Selector]:
    def decorator(selector: Selector) -> Selector:
        if kind in SELECTORS:
            raise ValueError(f"trainable kind {kind!r} is registered twice")
        SELECTORS[kind] = selector
        return selector

    return decorator


def select_trainable(model: nn.Module, spec: TrainableConfig) -> TrainableSet:
    """Pick the trainable tensors; everything else gets ``requires_grad=False``.

    Tied weights appear once (under their first name), as ``named_parameters`` lists them.
    ``lora`` and ``mask`` change the model in place (adapters injected, linear layers
    wrapped in sparse-delta layers) before picking.
    """
    if spec.kind not in SELECTORS:
        raise ConfigError(
            f"trainable.kind {spec.kind!r} is not supported; choose one of {sorted(SELECTORS)}"
        )
    chosen = SELECTORS[spec.kind](model, spec)
    quantized = [name for name, p in chosen if not p.is_floating_point()]
    if quantized:
        raise ConfigError(
            f"trainable.kind {spec.kind!r} picks quantized (4-bit) weights such as "
            f"{quantized[0]}, which stay frozen: train a sparse delta (trainable=mask:PATH) "
            "or LoRA (trainable=lora) over a quantized base"
        )
    chosen_ids = {id(p) for _, p in chosen}
    for _, p in model.named_parameters():
        p.requires_grad_(id(p) in chosen_ids)
    return TrainableSet([name for name, _ in chosen], [p for _, p in chosen])


@register_selector("full")
def _full(model: nn.Module, spec: TrainableConfig) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters())


@register_selector("names")
def _names(model: nn.Module, spec: TrainableConfig) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())
    unmatched = [
        pat for pat in spec.patterns if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named)
    ]
    if unmatched:
        examples = ", ".join(name for name, _ in named[:6])
        raise ConfigError(
            f"trainable.patterns {unmatched} match no parameter; names look like: {examples}"
        )
    return [
        (name, p)
        for name, p in named
        if any(fnmatch.fnmatchcase(name, pat) for pat in spec.patterns)
    ]


@register_selector("mask")
def _mask(model: nn.Module, spec: TrainableConfig) -> list[tuple[str, nn.Parameter]]:
    """``mask:PATH``: sparse fp32 deltas at the mask file's indices (``zo mask`` writes it)."""
    if not spec.path:
        raise ConfigError(
            "trainable kind mask needs the mask file: trainable=mask:PATH "
            "(make one with `zo mask --model ... --out PATH`)"
        )
    return select_mask_trainable(model, spec.path)


@register_selector("lora")
def _lora(model: nn.Module, spec: TrainableConfig) -> list[tuple[str, nn.Parameter]]:
    """``lora`` or ``lora:q_proj,v_proj``: peft LoRA adapters on ``lora_targets``."""
    try:
        return add_lora(
            model, r=spec.lora_r, alpha=spec.lora_alpha, target_modules=spec.lora_targets
        )
    except LoraError as error:
        raise ConfigError(f"trainable lora: {error}") from None


class LoraError(ValueError):
    """LoRA options that peft cannot apply to the model (rank < 1, absent target modules)."""


def select_mask_trainable(
    model: nn.Module, mask_path: str | os.PathLike[str]
) -> list[tuple[str, nn.Parameter]]:
    """Sparse fp32 deltas at a mask file's indices; everything else frozen."""
    return apply_sparse_deltas(model, read_mask_indices(mask_path))


def lora_config(
    r: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    dropout: float = 0.0,
    task_type: str | None = None,
) -> LoraConfig:
    """The peft ``LoraConfig`` of a run's adapters: what :func:`add_lora` injects and what
    ``zo export`` writes as ``adapter_config.json``."""
    from peft import LoraConfig

    if r < 1:
        raise LoraError(f"LoRA rank must be >= 1, got {r}")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type=task_type,
    )


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    dropout: float = 0.0,
) -> list[tuple[str, nn.Parameter]]:
    """LoRA adapters (peft) injected in place over the (possibly 4-bit) base; only they train.

    Injected, not wrapped in a ``PeftModel``: the model object and its forward stay the same.
    """
    from peft import inject_adapter_in_model

    config = lora_config(r, alpha, target_modules, dropout)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:
        raise LoraError(f"LoRA target_modules {list(target_modules)}: {error}") from None
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------- param groups


def param_groups(
    trainable: TrainableSet, specs: list[dict[str, Any]] | None
) -> list[tuple[str, nn.Parameter]] | list[dict[str, Any]]:
    """``estimator.param_groups`` as torch param groups of ``(name, tensor)`` pairs.

    Each spec is ``{match: [fnmatch patterns over trainable names], <setting>: value, ...}``
    (e.g. ``lr``, ``eps``, ``weight_decay``); a tensor joins the first spec that matches it,
    the rest form a last group with the estimator's own settings. Without specs: the named
    tensors as they are (one group).
    """
    named = list(zip(trainable.names, trainable.params, strict=True))
    if not specs:
        return named
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise ConfigError(
            "estimator.param_groups must be a list of mappings like "
            "{match: ['model.layers.0.*'], lr: 1.0e-6}"
        )
    groups: list[dict[str, Any]] = []
    taken: set[str] = set()
    for position, spec in enumerate(specs):
        where = f"estimator.param_groups[{position}]"
        patterns = spec.get("match")
        if isinstance(patterns, str):
            patterns = [patterns]
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ConfigError(f"{where}: give `match`, a list of name patterns (fnmatch)")
        if "params" in spec:
            raise ConfigError(f"{where}: tensors are chosen by `match`, not `params`")
        members = [
            (name, p)
            for name, p in named
            if name not in taken and any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        ]
        if not members:
            raise ConfigError(
                f"{where}: {patterns} match no trainable tensor not already in an earlier "
                f"group; trainable names look like {trainable.names[:3]}"
            )
        taken.update(name for name, _ in members)
        settings = {
            key: _number(value, f"{where}.{key}") for key, value in spec.items() if key != "match"
        }
        groups.append({"params": members, **settings})
    rest = [(name, p) for name, p in named if name not in taken]
    if rest:
        groups.append({"params": rest})
    return groups


def _number(value: Any, where: str) -> Any:
    """YAML reads ``1e-6`` (no dot) as a string: accept it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a number") from None
    return value


def check_group_settings(optimizer: torch.optim.Optimizer, groups: list[Any]) -> None:
    """Every per-group setting must be one the optimizer has (its ``defaults``)."""
    for position, group in enumerate(g for g in groups if isinstance(g, dict)):
        unknown = sorted(set(group) - {"params", "param_names"} - set(optimizer.defaults))
        if unknown:
            raise ConfigError(
                f"estimator.param_groups[{position}]: {unknown} are not per-group settings of "
                f"{type(optimizer).__name__}; choose from {sorted(optimizer.defaults)}"
            )
