"""Offloaded ZO: decoder blocks live in host memory and visit the device one layer at a time.

ZO keeps no gradients and no optimizer state, so a model that does not fit on the device
can train if its blocks stay on the host (``home``) and each layer's weights are copied to
the device only for that layer's forward. The perturbation engine works on the weights
where they live: a perturbed copy ``W + eps z`` is drawn at home from the seed and copied
over; the update is applied at home. Nothing but activations and one layer's weights
occupies the device.

The copy happens in a module-local forward pre-hook on every leaf module of a block, which
runs after the engine's global hooks have swapped in the perturbed copy, so perturbation and
transfer compose; the post-hook puts back whatever the module held before the copy.

Not done yet: overlapping the next layer's transfer with the current layer's compute (a
side stream and pinned buffers); each copy here waits for the one before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from zo.blocks import decoder_blocks
from zo.config import ConfigError

__all__ = ["OffloadError", "Offloaded", "check_offloaded_run", "offload_blocks"]

Transfer = Callable[[torch.Tensor], torch.Tensor]


class Offloaded:
    """Hooks that stream ``blocks``' weights from home to ``device`` for each layer's call.

    ``transfer`` makes the device copy; on a CPU-only machine pass a copying transfer
    (``Tensor.clone``) to exercise the same path across a simulated boundary.
    """

    def __init__(self, blocks: Sequence[nn.Module], transfer: Transfer):
        self.transfer = transfer
        self.copies = 0
        self._handles = []
        self._held: dict[int, list[list[tuple[str, torch.Tensor, torch.Tensor]]]] = {}
        for block in blocks:
            for module in block.modules():
                if any(p is not None for p in module._parameters.values()):
                    self._handles.append(module.register_forward_pre_hook(self._to_device))
                    self._handles.append(
                        module.register_forward_hook(self._to_home, always_call=True)
                    )

    def _to_device(self, module: nn.Module, args) -> None:
        swapped = []
        for name, value in module._parameters.items():
            if value is None:
                continue
            copy = self.transfer(value.detach())
            module._parameters[name] = copy
            swapped.append((name, value, copy))
            self.copies += 1
        self._held.setdefault(id(module), []).append(swapped)

    def _to_home(self, module: nn.Module, args, output) -> None:
        for name, value, copy in self._held[id(module)].pop():
            # the engine's hook (global, so it ran first) may have put its weight back already
            if module._parameters[name] is copy:
                module._parameters[name] = value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def offload_blocks(model: nn.Module, device: torch.device) -> Offloaded:
    """Keep ``model``'s decoder blocks on the host and stream them to ``device`` per layer;
    the rest (embeddings, norm, head) stays on ``device``. On a CPU ``device`` the blocks
    cross a simulated boundary (a copy per layer call), the same code path."""
    blocks = decoder_blocks(model)
    model.to(device)
    if device.type == "cpu":
        return Offloaded(blocks, torch.Tensor.clone)
    for block in blocks:
        for param in block.parameters():
            param.data = param.data.to("cpu").pin_memory()  # pinned: copies run async
    return Offloaded(blocks, lambda tensor: tensor.to(device, non_blocking=True))


OFFLOADABLE_ESTIMATORS = (
    "zo_sgd",
    "zo_sgd_sign",
    "zo_sgd_momentum",
    "zo_sgd_conservative",
    "zo_adam",
)
"""Estimators whose forwards are plain or engine-perturbed ones (no autograd, no jvp tangents
through the copies), so streamed weights change nothing but where they live."""


class OffloadError(ConfigError):
    """A ``train.parallel=offload`` run that cannot be offloaded (exit 2 from the CLI)."""


def check_offloaded_run(config, world_size: int) -> None:
    """Refuse what offloaded ZO does not do, before any model loads (never a fallback)."""
    if config.train.parallel != "offload":
        return
    fix = "or set train.parallel=data"
    if world_size > 1:
        raise OffloadError(
            f"train.parallel=offload runs in one process, and {world_size} were launched: run "
            "it without torchrun, or use train.parallel=fsdp to spread the model over them"
        )
    name = config.estimator.get("name")
    if name not in OFFLOADABLE_ESTIMATORS:
        raise OffloadError(
            f"estimator {name!r} cannot run offloaded (train.parallel=offload supports "
            f"{list(OFFLOADABLE_ESTIMATORS)}: gradients and jvp tangents do not cross the "
            f"per-layer copies): {fix}"
        )
    if config.model.quant != "none":
        raise OffloadError(f"model.quant={config.model.quant} cannot run offloaded: {fix}")
