"""The 4-bit frozen base (bitsandbytes NF4/FP4).

Two ways to a quantized model, neither of which holds the model in full precision:

* :func:`load_quantized` -- a local checkpoint through ``from_pretrained`` with a
  ``BitsAndBytesConfig``: transformers quantizes each weight as it loads.
* :func:`build_random_quantized` -- a random model of any config (Llama-2-7B shapes for
  memory benchmarks): the skeleton is built on the ``meta`` device, then each linear layer is
  drawn in fp32 and quantized at once, so the fp32 temporary is one layer. Embeddings and the
  output head stay in ``float_dtype`` (bf16 by default: 2 bytes a weight instead of 4, i.e.
  0.5 GiB saved at 7B); hooks cast their input/output so the residual stream stays in the
  compute dtype.

On CPU use ``compute_dtype=torch.float32``: bitsandbytes dequantizes to it and bf16 matmuls
are slow without AVX512-BF16/AMX. The trainable sets over a 4-bit base are a sparse fp32
delta or LoRA (:mod:`zo.trainable`); the 4-bit weights themselves are frozen and the
perturbation engine refuses them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from zo.engine import seeded

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

QUANT_TYPES = ("nf4", "fp4")
"""bitsandbytes 4-bit formats: NF4 (normal-float, QLoRA's) and FP4."""


class QuantizationError(ValueError):
    """A quantization request that cannot be met (unknown type, missing checkpoint)."""


def _check_quant(quant: str) -> None:
    if quant not in QUANT_TYPES:
        raise QuantizationError(f"quant {quant!r} is not supported; choose one of {QUANT_TYPES}")


def load_quantized(
    model_dir: str | os.PathLike[str],
    quant: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    attn: str = "eager",
    double_quant: bool = True,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """A local HF checkpoint with every linear layer but the head in 4 bits, in eval mode,
    quantized shard by shard straight onto ``device``.

    Non-quantized weights (embeddings, norms, head) load in ``compute_dtype``.
    """
    import transformers

    _check_quant(quant)
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise QuantizationError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )
    from zo.models import architecture_for

    model = architecture_for(path).from_pretrained(  # RoBERTa: the masked LM, as unquantized
        path,
        quantization_config=config,
        dtype=compute_dtype,
        attn_implementation=attn,
        use_safetensors=True,
        local_files_only=True,
        device_map={"": _device_map_target(torch.device(device))},
    )
    fp32_4bit_kernels(model)
    model.eval()
    return model


def fp32_4bit_kernels(model: nn.Module) -> int:
    """Keep fp32-compute 4-bit layers off bitsandbytes' packed CPU kernel; returns how many.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` at its first
    eval-mode forward and from then on runs a kernel that (1) rounds activations to bf16,
    about 0.4% error per layer, far above the ``eps``-sized signal a ZO finite difference
    measures, and (2) has no autograd formula, so backward silently drops the input's
    gradient. Layers whose compute dtype is fp32 are unpacked and kept on the
    dequantize + fp32 matmul path, which matches ``F.linear(x, dequantize(W))`` exactly.
    """
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ != "Params4bit" or not hasattr(module, "compute_dtype"):
            continue
        if module.compute_dtype not in (None, torch.float32):
            continue  # a bf16-compute model asked for bf16 kernels
        module.support_avx512bf16_for_cpu = False
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            import bitsandbytes.functional as bnbf

            weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        count += 1
    return count


# ---------------------------------------------------------------------- random builds


def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    double_quant: bool = True,
) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``weight`` quantized (``weight`` can be freed)."""
    import bitsandbytes as bnb

    _check_quant(quant)
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach(),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant,
        module=layer,
    ).to(device)  # .to() on an unquantized Params4bit quantizes it
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device, compute_dtype), requires_grad=False)
    return layer


def _device_map_target(device: torch.device) -> str | int:
    if device.type != "cuda":
        return device.type
    return torch.cuda.current_device() if device.index is None else device.index


def _cast_input(dtype: torch.dtype):
    def hook(module: nn.Module, args):
        return (args[0].to(dtype), *args[1:])

    return hook


def _cast_output(dtype: torch.dtype):
    def hook(module: nn.Module, args, output):
        return output.to(dtype)

    return hook


def build_random_quantized(
    config: PretrainedConfig,
    quant: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    float_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    attn: str = "eager",
    double_quant: bool = True,
) -> PreTrainedModel:
    """A random causal LM of ``config``: 4-bit linear layers, embeddings/head in ``float_dtype``.

    Peak memory while building is the finished model plus one fp32 linear weight (plus one
    fp32 embedding while it is drawn). Initialisation is the model's own ``_init_weights``
    (normal with ``initializer_range``), seeded; the global RNG is left as it was.
    """
    import transformers

    _check_quant(quant)
    config._attn_implementation = attn
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    head = model.get_output_embeddings()
    device = torch.device(device)
    with seeded(seed, device):
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and module is not head:
                _materialise(model, module, device)
                layer = quantize_linear(
                    module.weight, module.bias, quant, compute_dtype, device, double_quant
                )
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, layer)
                # The module list above still references the fp32 layer: drop its tensors,
                # or every fp32 weight would stay alive until the build ends.
                module.weight = module.bias = None
            elif _on_meta(module):
                _materialise(model, module, device)
                if isinstance(module, nn.Embedding) or module is head:
                    module.to(float_dtype)
                    # The residual stream stays in the compute dtype.
                    if isinstance(module, nn.Embedding):
                        module.register_forward_hook(_cast_output(compute_dtype))
                    else:
                        module.register_forward_pre_hook(_cast_input(float_dtype))
                        module.register_forward_hook(_cast_output(compute_dtype))
                else:
                    module.to(compute_dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise QuantizationError(f"{type(model).__name__}: some tensors were never materialised")
    model.requires_grad_(False)
    fp32_4bit_kernels(model)
    model.eval()
    return model


def _on_meta(module: nn.Module) -> bool:
    tensors = (*module.parameters(recurse=False), *module.buffers(recurse=False))
    return any(t.is_meta for t in tensors)


def _materialise(model: nn.Module, module: nn.Module, device: torch.device) -> None:
    """Allocate ``module``'s own tensors on ``device`` and initialise them as the model would."""
    for name, param in module.named_parameters(recurse=False):
        module.register_parameter(
            name, nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
        )
    for name, buffer in module.named_buffers(recurse=False):
        module._buffers[name] = torch.empty_like(buffer, device=device)
    with torch.no_grad():
        model._init_weights(module)
