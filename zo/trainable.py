"""Which tensors train: the estimator sees exactly these, in a stable order."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zo.config import ConfigError, TrainableConfig


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
    from zo.quant import select_mask_trainable

    if not spec.path:
        raise ConfigError(
            "trainable kind mask needs the mask file: trainable=mask:PATH "
            "(make one with `zo mask --model ... --out PATH`)"
        )
    return select_mask_trainable(model, spec.path)


@register_selector("lora")
def _lora(model: nn.Module, spec: TrainableConfig) -> list[tuple[str, nn.Parameter]]:
    """``lora`` or ``lora:q_proj,v_proj``: peft LoRA adapters on ``lora_targets``."""
    from zo.quant import QuantizationError, add_lora

    try:
        return add_lora(
            model, r=spec.lora_r, alpha=spec.lora_alpha, target_modules=spec.lora_targets
        )
    except QuantizationError as error:
        raise ConfigError(f"trainable lora: {error}") from None
