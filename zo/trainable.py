"""Which tensors train: the estimator sees exactly these, in a stable order."""

from __future__ import annotations

import fnmatch
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


def select_trainable(model: nn.Module, spec: TrainableConfig) -> TrainableSet:
    """Pick the trainable tensors; everything else gets ``requires_grad=False``.

    Tied weights appear once (under their first name), as ``named_parameters`` lists them.
    """
    named = list(model.named_parameters())
    if spec.kind == "full":
        chosen = named
    elif spec.kind == "names":
        chosen = [
            (name, p)
            for name, p in named
            if any(fnmatch.fnmatchcase(name, pat) for pat in spec.patterns)
        ]
        unmatched = [
            pat for pat in spec.patterns if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named)
        ]
        if unmatched:
            examples = ", ".join(name for name, _ in named[:6])
            raise ConfigError(
                f"trainable.patterns {unmatched} match no parameter; names look like: {examples}"
            )
    else:  # the config schema admits no other kind
        raise ConfigError(f"trainable.kind {spec.kind!r} is not supported")
    chosen_ids = {id(p) for _, p in chosen}
    for _, p in named:
        p.requires_grad_(id(p) in chosen_ids)
    return TrainableSet([name for name, _ in chosen], [p for _, p in chosen])
