"""The 4-bit base: loading, random layer-by-layer builds, exact fp32 kernels, trainable sets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import estimators
from tests.tiny import IDS, fresh_tiny
from zo.config import ConfigError, TrainableConfig
from zo.models import tiny_model
from zo.trainable import select_trainable

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

from zo.quant import (  # noqa: E402  (needs bitsandbytes)
    QuantizationError,
    build_random_quantized,
    load_quantized,
    quantize_linear,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tokenizer = fresh_tiny()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def four_bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def dequantized_copy(quantized: nn.Module) -> nn.Module:
    """The tiny fp32 model with every 4-bit weight replaced by its dequantized value."""
    reference, _ = fresh_tiny()
    with torch.no_grad():
        for name, layer in four_bit_layers(quantized).items():
            weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            reference.get_submodule(name).weight.copy_(weight)
    return reference


def loss(model: nn.Module) -> torch.Tensor:
    logits = model(input_ids=IDS[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))


def test_load_quantized_computes_the_dequantized_model_in_fp32(tiny_dir):
    model = load_quantized(tiny_dir)
    layers = four_bit_layers(model)
    assert len(layers) == 2 * 7  # every projection of both decoder layers
    assert all(layer.weight.dtype == torch.uint8 for layer in layers.values())
    reference = dequantized_copy(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
        original, _ = fresh_tiny()
        error = (model(IDS).logits - original(IDS).logits).abs().max()
    assert 0 < error < 0.5  # really quantized, still the same model


def test_4bit_layers_pass_input_gradients_after_an_eval_forward(tiny_dir):
    """bitsandbytes' packed CPU kernel drops input gradients; our models stay off it."""
    model = load_quantized(tiny_dir)
    reference = dequantized_copy(model)
    with torch.no_grad():
        model(IDS)  # the first eval forward is when bitsandbytes would repack
    hidden = model.model.embed_tokens(IDS).detach().requires_grad_()
    expected = reference.model.embed_tokens(IDS).detach().requires_grad_()
    model(inputs_embeds=hidden).logits.square().mean().backward()
    reference(inputs_embeds=expected).logits.square().mean().backward()
    assert hidden.grad is not None
    torch.testing.assert_close(hidden.grad, expected.grad, rtol=1e-4, atol=1e-7)


def test_load_quantized_errors():
    with pytest.raises(QuantizationError, match="choose one of"):
        load_quantized(".", quant="int3")
    with pytest.raises(QuantizationError, match="no config.json"):
        load_quantized("/nonexistent")


def test_quantize_linear_matches_bitsandbytes_quantization():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    layer = quantize_linear(weight, None)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    assert torch.equal(layer.weight.data, packed)
    x = torch.randn(3, 64)
    expected = F.linear(x, bnbf.dequantize_4bit(packed, state))
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def small_config(tie: bool = False):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )


def test_random_build_quantizes_every_linear_but_the_head():
    model = build_random_quantized(small_config(), seed=3)
    assert len(four_bit_layers(model)) == 14
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    assert torch.all(model.model.norm.weight == 1)  # the model's own init
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # weights are drawn from N(0, initializer_range) before quantization
    layer = model.model.layers[0].mlp.up_proj
    weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert 0.015 < float(weight.std()) < 0.025
    # the seed fixes every weight
    again = build_random_quantized(small_config(), seed=3)
    other = build_random_quantized(small_config(), seed=4)
    assert torch.equal(
        again.model.layers[1].self_attn.q_proj.weight.data,
        model.model.layers[1].self_attn.q_proj.weight.data,
    )
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_random_build_ties_the_head_when_the_config_does():
    model = build_random_quantized(small_config(tie=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---------------------------------------------------------------------------- trainable sets
def write_mask(path, model: nn.Module, names: list[str], density: float = 0.05) -> dict:
    mask = {}
    for i, name in enumerate(names):
        module = model.get_submodule(name.removesuffix(".weight"))
        numel = module.out_features * module.in_features
        generator = torch.Generator().manual_seed(i)
        k = max(1, int(numel * density))
        mask[name] = torch.randperm(numel, generator=generator)[:k].sort().values.int()
    metadata = {
        "density": str(density),
        "source": "test",
        "selection": "random",
        "tokens": "0",
        "model_id": "tiny",
        "format_version": "1",
    }
    save_file(mask, str(path), metadata=metadata)
    return mask


MASKED = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]


def test_trainable_mask_kind_trains_sparse_values_over_a_4bit_base(tiny_dir, tmp_path):
    model = load_quantized(tiny_dir)
    mask = write_mask(tmp_path / "mask.safetensors", model, MASKED)
    spec = TrainableConfig(kind="mask", path=str(tmp_path / "mask.safetensors"))
    trainable = select_trainable(model, spec)
    assert trainable.names == [  # model order, not file order
        "model.layers.0.self_attn.q_proj.values",
        "model.layers.1.mlp.down_proj.values",
    ]
    assert trainable.numel() == sum(m.numel() for m in mask.values())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable.names
    packed = {n: m.weight.data.clone() for n, m in four_bit_layers(model).items()}
    optimizer = estimators.build_estimator(
        "zo_sgd", list(zip(trainable.names, trainable.params, strict=True)), lr=1e-2
    )
    optimizer.step(lambda: loss(model))
    assert all(p.abs().sum() > 0 for p in trainable.params)
    assert all(torch.equal(m.weight.data, packed[n]) for n, m in four_bit_layers(model).items())


def test_trainable_mask_without_a_path_is_a_config_error(tiny_dir):
    model, _ = fresh_tiny()
    with pytest.raises(ConfigError, match="mask:PATH"):
        select_trainable(model, TrainableConfig(kind="mask"))
    with pytest.raises(ConfigError, match="does not exist"):
        select_trainable(model, TrainableConfig(kind="mask", path="/nonexistent.safetensors"))


def test_trainable_lora_kind_trains_adapters_over_a_4bit_base(tiny_dir):
    model = load_quantized(tiny_dir)
    with torch.no_grad():
        before = model(IDS).logits
    trainable = select_trainable(
        model, TrainableConfig(kind="lora", lora_targets=["q_proj", "v_proj"])
    )
    assert len(trainable.names) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)
    assert all("lora_" in n for n in trainable.names)
    with torch.no_grad():  # B starts at zero: the adapted model computes the base model
        torch.testing.assert_close(model(IDS).logits, before)
    optimizer = estimators.build_estimator(
        "zo_sgd", list(zip(trainable.names, trainable.params, strict=True)), lr=1e-2
    )
    optimizer.step(lambda: loss(model))
    with torch.no_grad():
        assert not torch.equal(model(IDS).logits, before)
    with pytest.raises(ConfigError, match="lora"):
        select_trainable(fresh_tiny()[0], TrainableConfig(kind="lora", lora_targets=["nope"]))


def test_full_and_names_kinds_keep_their_behaviour():
    model, _ = fresh_tiny()
    full = select_trainable(model, TrainableConfig(kind="full"))
    assert full.names == [n for n, _ in model.named_parameters()]
    names = select_trainable(model, TrainableConfig(kind="names", patterns=["*.norm.weight"]))
    assert names.names == ["model.norm.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names.names
    with pytest.raises(ConfigError, match="choose one of"):
        select_trainable(model, TrainableConfig(kind="bogus"))


def test_the_full_kind_over_a_4bit_base_is_a_clear_error(tiny_dir):
    model = load_quantized(tiny_dir)
    with pytest.raises(ConfigError, match="mask:PATH"):
        select_trainable(model, TrainableConfig(kind="full"))


def test_a_masked_lm_checkpoint_loads_quantized_as_its_family_class(tmp_path):
    from zo.quant import load_quantized

    source, _ = tiny_model("roberta")
    source.save_pretrained(tmp_path)
    model = load_quantized(tmp_path)
    assert type(model).__name__ == "RobertaForMaskedLM"  # MeZO's RoBERTa prompts need it
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
