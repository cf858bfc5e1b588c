"""Sparse-delta layers against dense references: forward, perturbation, jvp, gradients, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import estimators
from tests.tiny import IDS, fresh_tiny
from zo import sparse_chunks, sparse_delta
from zo.engine import FrozenTensorError, PerturbationEngine
from zo.jvp import directional_derivative
from zo.sparse_delta import (
    SparseDeltaError,
    SparseDeltaLinear,
    add_sparse_delta,
    apply_sparse_deltas,
    sparse_delta_layers,
)

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

from zo.quant import quantize_linear  # noqa: E402  (needs bitsandbytes)


def random_indices(numel: int, density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    k = max(1, int(numel * density))
    return torch.randperm(numel, generator=generator)[:k].sort().values.to(torch.int32)


def random_values(k: int, seed: int, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(k, generator=torch.Generator().manual_seed(seed)) * scale


def dense_delta(indices: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    delta = torch.zeros(shape).view(-1)
    delta[indices.long()] = values
    return delta.view(shape)


def layer_mask(model: nn.Module, density: float = 0.05) -> dict[str, torch.Tensor]:
    """Indices for every attention/MLP projection of a tiny model (built by hand, as a test)."""
    mask = {}
    for i, (name, module) in enumerate(model.named_modules()):
        if name.rsplit(".", 1)[-1] in {
            "q_proj",
            "v_proj",
            "up_proj",
            "down_proj",
            "out_proj",
            "fc2",
        }:
            mask[name + ".weight"] = random_indices(
                module.out_features * module.in_features, density, i
            )
    return mask


def lm_loss(model: nn.Module) -> torch.Tensor:
    logits = model(input_ids=IDS[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))


def nf4_linear(out_features: int = 24, in_features: int = 64, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.2
    return quantize_linear(weight, torch.randn(out_features, generator=generator) * 0.1)


def dequantized(layer: nn.Module) -> torch.Tensor:
    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64)])
def test_forward_equals_the_dense_weight_plus_the_scattered_delta(shape):
    torch.manual_seed(0)
    base = nn.Linear(64, 24)
    indices = random_indices(64 * 24, 0.1, 1)
    values = random_values(indices.numel(), 2)
    layer = SparseDeltaLinear(base, indices, values)
    x = torch.randn(shape)
    expected = F.linear(x, base.weight + dense_delta(indices, values, (24, 64)), base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.dense_delta(), dense_delta(indices, values, (24, 64)))


def test_bf16_base_adds_the_fp32_delta_to_its_output():
    torch.manual_seed(0)
    base = nn.Linear(64, 24, bias=False).to(torch.bfloat16)
    indices = random_indices(64 * 24, 0.1, 1)
    values = random_values(indices.numel(), 2)
    layer = SparseDeltaLinear(base, indices, values)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.values.dtype == torch.float32
    delta = F.linear(x.float(), dense_delta(indices, values, (24, 64)))
    torch.testing.assert_close(out, (base(x).float() + delta).to(torch.bfloat16))


def test_nf4_base_equals_the_dequantized_weight_plus_delta():
    base = nf4_linear()
    assert base.weight.dtype == torch.uint8
    indices = random_indices(64 * 24, 0.1, 3)
    values = random_values(indices.numel(), 4)
    layer = SparseDeltaLinear(base, indices, values)
    x = torch.randn(5, 64)
    weight = dequantized(base) + dense_delta(indices, values, (24, 64))
    torch.testing.assert_close(layer(x), F.linear(x, weight, base.bias), rtol=1e-5, atol=1e-5)


def add_in_one_block(layer: SparseDeltaLinear, x: torch.Tensor) -> torch.Tensor:
    return add_sparse_delta(x, layer.base(x), layer.values, layer.rows, layer.cols)


def seeded_layer(dtype: torch.dtype, density: float) -> SparseDeltaLinear:
    torch.manual_seed(0)
    indices = random_indices(64 * 24, density, 1)
    return SparseDeltaLinear(
        nn.Linear(64, 24).to(dtype), indices, random_values(indices.numel(), 2)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_forward_in_token_chunks_is_bit_identical_to_one_block(monkeypatch, dtype):
    layer = seeded_layer(dtype, 0.1)
    indices = layer.indices
    x = torch.randn(3, 7, 64, dtype=dtype)
    with torch.no_grad():
        whole = add_in_one_block(layer, x)
    size = x.element_size()
    per_token = sparse_chunks.forward_bytes_per_token(indices.numel(), 24, size, size)
    monkeypatch.setattr(sparse_chunks, "SPARSE_SCRATCH_BYTES", 4 * per_token)
    assert sparse_chunks.chunk_tokens(per_token) == 4  # 21 tokens: 6 chunks
    blocks = []
    one_block = sparse_delta.add_sparse_delta

    def counting(x, *args):
        blocks.append(x.shape[0])
        return one_block(x, *args)

    monkeypatch.setattr(sparse_delta, "add_sparse_delta", counting)
    with torch.no_grad():
        chunked = layer(x)
    assert blocks == [4, 4, 4, 4, 4, 1]
    assert chunked.shape == whole.shape and torch.equal(chunked, whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_autograd_equals_the_composite_and_saves_no_gathered_block(monkeypatch, dtype):
    layer = seeded_layer(dtype, 0.2)
    base, indices = layer.base, layer.indices
    x = torch.randn(3, 7, 64, dtype=dtype, requires_grad=True)
    head = torch.randn(24, dtype=dtype)
    reference = (add_in_one_block(layer, x) * head).square().sum()
    # the fp32 composite is the reference (in bf16 the composite itself rounds every term)
    x32 = x.detach().float().requires_grad_()
    exact_layer = SparseDeltaLinear(copy.deepcopy(base).float(), indices, layer.values.detach())
    exact = (add_in_one_block(exact_layer, x32) * head.float()).square().sum()
    expected = torch.autograd.grad(exact, [x32, exact_layer.values])
    k = indices.numel()
    per_token = sparse_chunks.backward_bytes_per_token(k, x.element_size(), x.element_size())
    monkeypatch.setattr(sparse_chunks, "SPARSE_SCRATCH_BYTES", 5 * per_token)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        out = layer(x)
    assert out.grad_fn is not None and (21, k) not in saved and (3, 7, k) not in saved
    loss = (out * head).square().sum()
    assert torch.equal(loss, reference) if dtype == torch.float32 else True
    grads = torch.autograd.grad(loss, [x, layer.values])
    assert grads[0].dtype == dtype and grads[1].dtype == torch.float32
    if dtype == torch.float32:
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want)
        return
    # bf16: no further from the fp32 gradients than the bf16 composite's own autograd is
    composite = torch.autograd.grad(reference, [x, layer.values])
    for got, rounded, want in zip(grads, composite, expected, strict=True):
        error = (got.float() - want).abs().max()
        assert error <= 1.25 * (rounded.float() - want).abs().max() + 1e-3


def test_only_the_values_are_parameters_that_train():
    layer = SparseDeltaLinear(nf4_linear(), random_indices(64 * 24, 0.1, 0))
    trainable = [name for name, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["values"]
    assert layer.values.dtype == torch.float32 and torch.all(layer.values == 0)


# ---------------------------------------------------------------------------- model surgery
def test_apply_swaps_the_named_linears_and_freezes_the_rest():
    model, _ = fresh_tiny()
    with torch.no_grad():
        before = model(IDS).logits
    mask = layer_mask(model)
    named = apply_sparse_deltas(model, mask)
    assert [n for n, _ in named] == [
        name.removesuffix(".weight") + ".values" for name in sparse_delta_layers(model)
    ]
    assert {n.removesuffix(".values") + ".weight" for n, _ in named} == set(mask)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for n, _ in named]
    with torch.no_grad():  # zero deltas: the model computes what it did before
        torch.testing.assert_close(model(IDS).logits, before)


def test_apply_with_values_matches_the_dense_model():
    model, _ = fresh_tiny()
    reference, _ = fresh_tiny()
    mask = layer_mask(model)
    values = {
        name: random_values(idx.numel(), i, 0.05) for i, (name, idx) in enumerate(mask.items())
    }
    apply_sparse_deltas(model, mask, values)
    with torch.no_grad():
        for name, indices in mask.items():
            weight = reference.get_parameter(name)
            weight += dense_delta(indices, values[name], weight.shape)
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (
            {"model.layers.0.self_attn.nope.weight": torch.tensor([0], dtype=torch.int32)},
            "names no weight",
        ),
        ({"model.embed_tokens.weight": torch.tensor([0], dtype=torch.int32)}, "nn.Embedding"),
        ({"lm_head.weight": torch.tensor([0], dtype=torch.int32)}, "tied"),
        (
            {"model.layers.0.mlp.up_proj.weight": torch.tensor([64 * 128], dtype=torch.int32)},
            "span",
        ),
        ({"model.layers.0.mlp.up_proj.weight": torch.tensor([-1], dtype=torch.int32)}, "span"),
        ({"model.layers.0.mlp.up_proj.weight": torch.tensor([3, 3], dtype=torch.int32)}, "repeat"),
        ({"model.layers.0.mlp.up_proj.weight": torch.tensor([0.0])}, "int32 or int64"),
    ],
)
def test_masks_that_do_not_fit_the_model_are_clear_errors(mask, message):
    model, _ = fresh_tiny()
    with pytest.raises(SparseDeltaError, match=message):
        apply_sparse_deltas(model, mask)
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    assert not sparse_delta_layers(model)


def test_values_of_the_wrong_length_are_an_error():
    model, _ = fresh_tiny()
    mask = {"model.layers.0.mlp.up_proj.weight": torch.tensor([1, 5], dtype=torch.int32)}
    with pytest.raises(SparseDeltaError, match="2 indices"):
        apply_sparse_deltas(model, mask, {"model.layers.0.mlp.up_proj.weight": torch.zeros(3)})


# ---------------------------------------------------------------------------- engine
def test_perturbed_forward_sees_values_plus_eps_z_and_restores_bit_exactly():
    layer = SparseDeltaLinear(nf4_linear(), random_indices(64 * 24, 0.1, 0))
    with torch.no_grad():
        layer.values.copy_(random_values(layer.values.numel(), 1))
    engine = PerturbationEngine([layer.values])
    stored, packed = layer.values.detach().clone(), layer.base.weight.data.clone()
    x = torch.randn(5, 64)
    with torch.no_grad(), engine.perturbed(seed=11, scale=1e-2):
        perturbed = layer(x)
    shifted = stored + 1e-2 * engine.direction(11, 0)
    weight = dequantized(layer.base) + dense_delta(layer.indices, shifted, (24, 64))
    torch.testing.assert_close(
        perturbed, F.linear(x, weight, layer.base.bias), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(layer.values, stored)
    assert torch.equal(layer.base.weight.data, packed)


def test_a_zero_lr_zo_step_leaves_values_and_base_bit_identical():
    model, _ = fresh_tiny()
    named = apply_sparse_deltas(model, layer_mask(model))
    with torch.no_grad():
        for i, (_, p) in enumerate(named):
            p.copy_(random_values(p.numel(), i, 0.1))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = estimators.build_estimator("zo_sgd", named, lr=0.0, eps=1e-3)
    optimizer.step(lambda: lm_loss(model))
    assert optimizer.last_record.scalars[0] != 0.0
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_zo_sgd_moves_only_the_values_along_the_engine_direction():
    model, _ = fresh_tiny()
    named = apply_sparse_deltas(model, layer_mask(model))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    lr = 1e-2
    optimizer = estimators.build_estimator("zo_sgd", named, lr=lr, eps=1e-3)
    optimizer.step(lambda: lm_loss(model))
    record = optimizer.last_record
    for i, (_, p) in enumerate(named):
        expected = -lr * record.scalars[0] * optimizer.engine.direction(record.seeds[0], i)
        torch.testing.assert_close(p.detach(), expected)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_the_engine_refuses_4bit_weights():
    layer = nf4_linear()
    with pytest.raises(FrozenTensorError, match="quantized base stays frozen"):
        PerturbationEngine([layer.weight])
    with pytest.raises(FrozenTensorError):
        estimators.build_estimator("zo_sgd", list(layer.named_parameters()))


# ---------------------------------------------------------------------------- gradients
def test_forward_ad_through_the_sparse_4bit_layer_equals_autograd():
    """Directly with dual tensors (no forward_ad_safe): the layer itself dequantizes."""
    layer = SparseDeltaLinear(nf4_linear(), random_indices(64 * 24, 0.1, 0))
    pre = nn.Linear(8, 64)
    x = torch.randn(5, 8)
    v_values = torch.randn(layer.values.shape)
    v_pre = torch.randn(pre.weight.shape)

    def loss(values, pre_weight):
        h = torch.tanh(F.linear(x, pre_weight, pre.bias))
        layer._parameters["values"] = values
        try:
            return torch.tanh(layer(h)).square().sum()
        finally:
            layer._parameters["values"] = stored

    stored = layer.values
    with torch.no_grad(), fwAD.dual_level():
        dual = loss(
            fwAD.make_dual(stored.detach(), v_values), fwAD.make_dual(pre.weight.detach(), v_pre)
        )
        derivative = fwAD.unpack_dual(dual).tangent
    values, weight = stored.detach().requires_grad_(), pre.weight.detach().requires_grad_()
    g_values, g_weight = torch.autograd.grad(loss(values, weight), [values, weight])
    expected = (g_values * v_values).sum() + (g_weight * v_pre).sum()
    assert derivative is not None and float(derivative) != 0.0
    torch.testing.assert_close(derivative, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "opt"])  # OPT: biased 4-bit layers
def test_forward_grad_through_a_4bit_model_with_sparse_deltas_equals_autograd(tmp_path, family):
    from zo.quant import load_quantized

    source, _ = fresh_tiny(family)
    source.save_pretrained(tmp_path)
    model = load_quantized(tmp_path, attn="eager")
    named = apply_sparse_deltas(model, layer_mask(model))
    with torch.no_grad():
        for i, (_, p) in enumerate(named):
            p.copy_(random_values(p.numel(), i, 0.05))
    engine = PerturbationEngine([p for _, p in named])
    value, derivative = directional_derivative(lambda: lm_loss(model), engine, seed=5)
    grads = torch.autograd.grad(lm_loss(model), [p for _, p in named])
    expected = sum(float((g * engine.direction(5, i)).sum()) for i, g in enumerate(grads))
    assert derivative == pytest.approx(expected, rel=1e-4)
    assert value == pytest.approx(float(lm_loss(model).detach()), rel=1e-6)


def test_value_gradients_are_the_dense_weight_gradients_at_the_indices():
    model, _ = fresh_tiny()
    reference, _ = fresh_tiny()
    mask = layer_mask(model)
    named = apply_sparse_deltas(model, mask)
    lm_loss(model).backward()
    lm_loss(reference).backward()
    for name, p in named:
        weight = reference.get_parameter(name.removesuffix(".values") + ".weight")
        indices = mask[name.removesuffix(".values") + ".weight"].long()
        torch.testing.assert_close(p.grad, weight.grad.view(-1)[indices], rtol=1e-4, atol=1e-7)


def test_lomo_updates_the_values_by_minus_lr_times_their_gradient():
    model, _ = fresh_tiny()
    reference, _ = fresh_tiny()
    mask = layer_mask(model)
    named = apply_sparse_deltas(model, mask)
    apply_sparse_deltas(reference, mask)
    lr = 0.1
    expected = torch.autograd.grad(
        lm_loss(reference), [p for _, p in reference.named_parameters() if p.requires_grad]
    )
    optimizer = estimators.build_estimator("lomo", named, lr=lr)
    optimizer.step(lambda: lm_loss(model))
    for (_, p), g in zip(named, expected, strict=True):
        torch.testing.assert_close(p.detach(), -lr * g, rtol=1e-4, atol=1e-8)


def test_mask_files_are_read_by_the_one_strict_reader(tmp_path):
    from safetensors.torch import save_file

    from zo.config import ConfigError
    from zo.sparse_delta import read_mask_indices

    name = "model.layers.0.mlp.up_proj.weight"
    save_file({name: torch.tensor([1, 4], dtype=torch.int32)}, str(tmp_path / "hand.safetensors"))
    assert torch.equal(
        read_mask_indices(tmp_path / "hand.safetensors")[name],
        torch.tensor([1, 4], dtype=torch.int32),
    )
    save_file(
        {name: torch.tensor([1], dtype=torch.int32)},
        str(tmp_path / "v2.safetensors"),
        {"format_version": "2"},
    )
    save_file({name: torch.tensor([1], dtype=torch.int64)}, str(tmp_path / "wide.safetensors"))
    for file, message in [
        ("v2", "format_version '2'"),
        ("wide", "int32"),
        ("none", "does not exist"),
    ]:
        with pytest.raises(ConfigError, match=message):  # the CLI's exit 2
            read_mask_indices(tmp_path / f"{file}.safetensors")
