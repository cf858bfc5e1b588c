"""Exact directional derivatives ``d/dt L(W + t v)`` by forward-mode AD, tangents from the engine.

A forward-gradient step needs ``g . v`` for a seed-addressed direction ``v``. Forward-mode AD
gives it exactly in one forward pass that carries a tangent next to every activation:
each trainable tensor ``W_i`` is handed to its module as a dual tensor ``(W_i, v_i)``
through :meth:`PerturbationEngine.substituted`, and the loss comes out as ``(L, g . v)``.

Why ``torch.autograd.forward_ad`` and not ``torch.func.jvp`` + ``functional_call``: the
engine already swaps a module's parameters for the duration of its own call, so HF models
(tied weights, PEFT wrappers, any closure that calls the model however it likes) see dual
weights with no functional rewrite, and a closure stays a plain ``() -> loss`` function.

Costs: no activation is stored (the pass runs under ``no_grad``); every activation carries
a tangent of its own size, so a forward costs about 2-3x a plain one and its transient
memory about 2x. ``v_i`` is drawn when its module is called and dropped when the call
returns, so one weight-sized tangent is alive at a time, not a copy of the trainable set
(a tied weight is drawn once per use). A bf16/fp16 weight gets its tangent rounded to its
dtype; the update uses the fp32 direction, so the step moves along ``z`` while the scalar
was measured along ``round(z)``.

Traps this module closes (each is a clear :class:`ForwardADError`, never a silent zero):

* Fused attention kernels (SDPA on CPU, flash) have no forward-AD formula: models must run
  ``attn_implementation="eager"``; a module whose ``config`` says otherwise is refused.
* bitsandbytes ``Linear4bit`` runs a custom kernel that drops tangents without a word on
  some devices. Inside :func:`forward_ad_safe` every registered quantized layer type runs a
  plain-torch forward instead (:data:`JVP_FORWARDS`): ``F.linear(x, dequantize_4bit(W), b)``,
  which carries the input's tangent (the 4-bit weight itself is frozen; tangents come from
  trainable tensors elsewhere, e.g. before it or in a LoRA / sparse delta beside it).
  Any other layer holding an integer (quantized) weight that receives a tangent is refused.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from zo.engine import PerturbationEngine


class ForwardADError(RuntimeError):
    """Forward-mode AD cannot give a correct directional derivative through this model."""


FORWARD_AD_ATTENTION = frozenset({"eager"})
"""``config._attn_implementation`` values whose kernels have forward-AD formulas."""

JvpForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]

JVP_FORWARDS: dict[tuple[str, str], JvpForward] = {}
"""Plain-torch forwards for layer types whose own kernels drop tangents, keyed by
``(module, qualified class name)`` so that the library is imported only by whoever uses it."""


def register_jvp_forward(module: str, qualname: str) -> Callable[[JvpForward], JvpForward]:
    """Register ``forward(layer, x)`` to replace ``module.qualname.forward`` under forward AD."""

    def decorator(forward: JvpForward) -> JvpForward:
        JVP_FORWARDS[(module, qualname)] = forward
        return forward

    return decorator


@register_jvp_forward("bitsandbytes.nn", "Linear4bit")
def linear4bit_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit`` as ``F.linear(x, dequantize_4bit(W), bias)`` in its compute dtype.

    Costs one dequantized copy of this layer's weight for the duration of the call.
    """
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import modules as bnb_modules

    fix_state = getattr(bnb_modules, "fix_4bit_weight_quant_state_from_module", None)
    if fix_state is not None:
        fix_state(layer)  # recovers a quant_state lost in a parameter conversion, as bnb does
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        # bnb repacks weights for its AVX512-BF16 CPU kernel; dequantize wants the standard
        # layout back, as bnb's own .cuda() does before moving the weight.
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )
    input_dtype = x.dtype
    compute_dtype = layer.compute_dtype or x.dtype
    x = x.to(compute_dtype)
    dense = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(compute_dtype)
    bias = None if layer.bias is None else layer.bias.to(compute_dtype)
    return F.linear(x, dense, bias).to(input_dtype)


def _registered_classes() -> dict[type, JvpForward]:
    """The registered classes whose libraries are already imported (a model using them has)."""
    found = {}
    for (module_name, qualname), forward in JVP_FORWARDS.items():
        module = sys.modules.get(module_name)
        cls = getattr(module, qualname, None) if module is not None else None
        if isinstance(cls, type):
            found[cls] = forward
    return found


def _carries_tangent(values: Any) -> bool:
    return any(
        isinstance(v, torch.Tensor) and fwAD.unpack_dual(v).tangent is not None for v in values
    )


def _check_module(module: nn.Module, args: tuple, handled: tuple[type, ...]) -> None:
    config = getattr(module, "config", None)
    attention = getattr(config, "_attn_implementation", None) if config is not None else None
    if isinstance(attention, str) and attention not in FORWARD_AD_ATTENTION:
        raise ForwardADError(
            f"{type(module).__name__} uses attn_implementation={attention!r}, whose kernels have "
            "no forward-mode AD formula; load the model with attn_implementation='eager' "
            "(zo: model.attn=eager, which the loop sets for forward_grad)"
        )
    if isinstance(module, handled):
        return
    quantized = [
        name
        for name, p in module._parameters.items()
        if p is not None and not (p.is_floating_point() or p.is_complex())
    ]
    if quantized and _carries_tangent(args):
        raise ForwardADError(
            f"{type(module).__name__} holds quantized (integer) weights {quantized} and has no "
            "forward-AD rule: its kernel would drop the input's tangent and the directional "
            "derivative would be silently wrong. Register a plain-torch forward for it with "
            "zo.jvp.register_jvp_forward, or keep it out of the path of trainable tensors"
        )


@contextlib.contextmanager
def forward_ad_safe() -> Iterator[None]:
    """Forwards inside run registered quantized layers through plain torch and refuse the
    modules that would drop tangents (fused attention, unregistered quantized layers).

    The class-level patch is process-wide while the context is open: run nothing else on
    those layer types from another thread meanwhile.
    """
    patched = _registered_classes()
    originals = {cls: cls.__dict__.get("forward") for cls in patched}
    handled = tuple(patched)

    def guard(module: nn.Module, args: tuple) -> None:
        _check_module(module, args, handled)

    for cls, forward in patched.items():
        cls.forward = forward  # type: ignore[method-assign]
    hook = nn.modules.module.register_module_forward_pre_hook(guard)
    try:
        yield
    finally:
        hook.remove()
        for cls, original in originals.items():
            if original is None:
                del cls.forward
            else:
                cls.forward = original  # type: ignore[method-assign]


def directional_derivative(
    closure: Callable[[], torch.Tensor],
    engine: PerturbationEngine,
    seed: int,
    scales: Sequence[float] | None = None,
) -> tuple[float, float]:
    """``(L(W), g . v)`` with ``v_i = engine.direction(seed, i)`` (times ``scales[i]`` when
    given: steps in each tensor's own units), by one forward-AD pass.

    The stored weights are untouched. Raises :class:`ForwardADError` where the result
    would be wrong (a tangent dropped or never reaching the loss), never returns a silent 0;
    non-finite values are returned as they are, for the caller to judge.
    """
    reached: set[int] = set()

    def dual(index: int, weight: torch.Tensor) -> torch.Tensor:
        reached.add(index)
        tangent = engine.direction(seed, index)
        if scales is not None:
            tangent = tangent.mul_(scales[index])
        tangent = tangent.to(weight.dtype)
        return fwAD.make_dual(weight.detach(), tangent)

    with torch.no_grad(), fwAD.dual_level(), forward_ad_safe(), engine.substituted(dual):
        try:
            loss = closure()
        except NotImplementedError as error:
            if "forward AD" not in str(error):
                raise
            raise ForwardADError(
                f"an operation in the forward has no forward-mode AD formula: {error}\n"
                "Use eager attention (attn_implementation='eager') and plain-torch layers."
            ) from error
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ForwardADError(
                "forward-gradient needs the closure to return the loss as a one-element tensor "
                f"computed from the model, got {type(loss).__name__}"
            )
        value, derivative = fwAD.unpack_dual(loss)
    if derivative is None:
        where = (
            "no module read a trainable tensor during the closure (a parameter used outside "
            "its module's forward, or a frozen/detached copy?)"
            if not reached
            else "the loss has no tangent although trainable tensors were read: something "
            "between them and the loss dropped it (.item()/.detach(), a custom kernel)"
        )
        raise ForwardADError(f"forward-gradient could not differentiate the loss: {where}")
    return float(value), float(derivative)
