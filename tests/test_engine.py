"""The perturbation engine against references: seeds, exact restore, functional = dense."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zo.engine import (
    EngineConfig,
    FrozenTensorError,
    PerturbationEngine,
    build_engine,
    mix_seed,
    recorded_generator,
    resolve_generator,
)
from zo.engine_v1 import EngineV1

GENERATORS = ["philox", "torch-blocks"]


class TiedLM(nn.Module):
    """Embedding -> norm -> linear -> head tied to the embedding: every path the engine has."""

    def __init__(self, vocab: int = 40, dim: int = 16, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.norm(self.embed(ids)))))


IDS = torch.tensor([[1, 5, 7, 39], [0, 5, 5, 12]])


def engine_for(model: nn.Module, **config) -> PerturbationEngine:
    return PerturbationEngine(list(model.parameters()), EngineConfig(**config))


def dense_reference(model: nn.Module, engine: PerturbationEngine, seed: int, scale: float):
    """A model copy whose stored weights are W + scale * z: what a perturbed forward must see."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for index, param in enumerate(reference.parameters()):
            param.copy_((param.float() + scale * engine.direction(seed, index)).to(param.dtype))
    return reference


def test_mix_seed_is_deterministic_and_order_sensitive():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert len({mix_seed(1, 2, 3), mix_seed(3, 2, 1), mix_seed(1, 2), mix_seed(1, 2, 4)}) == 4
    assert 0 <= mix_seed(2**70, -1) < 2**63


def test_directions_are_seed_addressed_and_leave_global_rng_alone():
    model = TiedLM()
    engine = engine_for(model, chunk_size=64)
    state = torch.random.get_rng_state()
    first = engine.direction(7, 0)
    assert torch.equal(first, engine.direction(7, 0))
    assert not torch.equal(first, engine.direction(8, 0))
    assert not torch.equal(first[:16], engine.direction(7, 1)[:16].flatten()[:16].view(-1)[:16])
    assert torch.equal(state, torch.random.get_rng_state())
    assert abs(first.mean()) < 0.2 and abs(first.std() - 1) < 0.2


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_threaded_draws_are_bit_identical_to_serial(distribution):
    model = TiedLM(vocab=300, dim=32)
    serial = engine_for(model, chunk_size=100, threads=1, distribution=distribution)
    threaded = engine_for(model, chunk_size=100, threads=4, distribution=distribution)
    for index in range(len(serial.tensors)):
        assert torch.equal(
            serial.perturbed_copy(3, index, 0.1), threaded.perturbed_copy(3, index, 0.1)
        )
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    engine_for(a, chunk_size=100, threads=1, distribution=distribution).update(
        [3, 4], [0.1, -0.2], 0.99
    )
    engine_for(b, chunk_size=100, threads=4, distribution=distribution).update(
        [3, 4], [0.1, -0.2], 0.99
    )
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_rademacher_directions_are_signs():
    z = engine_for(TiedLM(), distribution="rademacher").direction(1, 0)
    assert set(z.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("generator", [*GENERATORS, "philox-ieee"])
@pytest.mark.parametrize("chunk_size", [0, 48])
@pytest.mark.parametrize(
    ("offload_threshold", "offload_max_rows"), [(1 << 22, -1), (0, -1), (0, 8), (0, 0)]
)
def test_perturbed_forward_equals_dense_perturbed_weights(
    generator, chunk_size, offload_threshold, offload_max_rows
):
    # threshold 0 sends the embedding (gathered rows of z) and the linear layers (perturbed
    # a block of output features at a time) through the output side; max_rows 0 then keeps
    # the linear layers on weight copies; IDS has 8 rows, within a limit of 8
    model = TiedLM()
    weights = [model.proj.weight, model.proj.bias, model.head.weight]
    engine = engine_for(
        model,
        chunk_size=chunk_size,
        offload_threshold=offload_threshold,
        offload_max_rows=offload_max_rows,
        generator=generator,
    )
    with torch.no_grad():
        with engine.perturbed(11, 0.01):
            perturbed = model(IDS)
        expected = dense_reference(model, engine, 11, 0.01)(IDS)
    assert [model.proj.weight, model.proj.bias, model.head.weight] == weights  # restored
    if offload_threshold == 0 and offload_max_rows != 0 and chunk_size == 48:
        # blocks of 3 output features: BLAS sums a block that narrow in another order
        torch.testing.assert_close(perturbed, expected, rtol=1e-5, atol=1e-5)
    else:  # the same values as the layers on weight copies, bit for bit
        assert torch.equal(perturbed, expected)
    assert not torch.equal(perturbed, model(IDS))


def test_offload_max_rows_below_minus_one_is_refused():
    with pytest.raises(ValueError, match="offload_max_rows must be -1 .any., 0 .never."):
        EngineConfig(offload_max_rows=-2)


def test_a_large_linear_layer_perturbed_through_its_output_costs_no_extra_matmul():
    """The head multiplies by W + eps z block by block (drawn into one chunk-sized buffer)
    instead of adding x z^T to x W^T: a perturbed forward has the plain forward's flops."""
    from torch.utils.flop_counter import FlopCounterMode

    model = TiedLM()
    engine = engine_for(model, offload_threshold=0)
    with torch.no_grad():
        with FlopCounterMode(display=False) as plain:
            model(IDS)
        with FlopCounterMode(display=False) as perturbed, engine.perturbed(3, 0.01):
            model(IDS)
    assert perturbed.get_total_flops() == plain.get_total_flops() > 0


def test_under_autocast_the_blocked_head_computes_as_the_layer_on_a_copy_would():
    """Mixed precision (train.autocast): each block goes through F.linear, so autocast picks
    the dtype and arithmetic the layer's own call would (bf16 here), bit for bit."""
    model = TiedLM()
    engine = engine_for(model, offload_threshold=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with engine.perturbed(11, 0.01):
            perturbed = model(IDS)
        expected = dense_reference(model, engine, 11, 0.01)(IDS)
    assert perturbed.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(perturbed, expected)


def test_a_perturbed_forward_that_records_gradients_keeps_the_additive_output_side():
    # blocks drawn into one reused buffer cannot be saved for backward: a forward under
    # grad adds x z^T to the layer's own output, and gradients flow to the input
    model = TiedLM()
    engine = engine_for(model, offload_threshold=0)
    hidden = torch.randn(2, 4, 16, requires_grad=True)
    with engine.perturbed(3, 0.01):
        logits = model.head(hidden)
    logits.square().sum().backward()
    with torch.no_grad():
        expected = dense_reference(model, engine, 3, 0.01).head(hidden)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bucketed_copies_are_bit_identical_to_the_dense_reference(generator, dtype):
    """A bucket's copies are ``W + scale * z`` computed in fp32 and rounded once: the weights
    each module sees equal the dense reference's in every dtype."""
    model = TiedLM().to(dtype)
    engine = engine_for(model, generator=generator)
    seen = {}

    def record(module, args):  # runs after the engine's hook: sees what the module sees
        for name, param in module._parameters.items():
            if param is not None:
                seen[(id(module), name)] = param.detach().clone()

    with torch.no_grad():
        with engine.perturbed(4, 0.02):
            hook = nn.modules.module.register_module_forward_pre_hook(record)
            try:
                model(IDS)
            finally:
                hook.remove()
        reference = dense_reference(model, engine, 4, 0.02)
    assert len(seen) == 6  # the tied embedding is seen by two modules
    for (module_id, name), weight in seen.items():
        module = next(m for m in model.modules() if id(m) == module_id)
        path = next(n for n, m in model.named_modules() if m is module)
        expected = reference.get_submodule(path)._parameters[name]
        assert weight.dtype == dtype and torch.equal(weight, expected), (path, name)


@pytest.mark.parametrize("generator", GENERATORS)
def test_buckets_prefetch_and_plan_change_no_value(generator):
    """Global coordinates: per-tensor draws, small or one big bucket, drawing ahead, and the
    first forward (no plan yet) all see the same perturbed model."""
    model = TiedLM(vocab=300, dim=32)
    outputs = []
    settings = [(1, "off"), (700, "on"), (1 << 30, "off"), (700, "off"), (1, "on")]
    for bucket_size, prefetch in settings:
        engine = engine_for(
            model, generator=generator, bucket_size=bucket_size, prefetch=prefetch, threads=2
        )
        for _ in range(2):  # the first forward learns the bucket plan the second one uses
            with torch.no_grad(), engine.perturbed(5, 0.01):
                outputs.append(model(IDS))
        engine.close()
    assert all(torch.equal(output, outputs[0]) for output in outputs)


@pytest.mark.parametrize("generator", GENERATORS)
def test_update_with_device_coefficients_equals_host_coefficients(generator):
    host, device = TiedLM(), TiedLM()
    engine_for(host, generator=generator).update([1, 2], [0.5, -0.25], decay=0.9)
    engine_for(device, generator=generator).update_device([1, 2], torch.tensor([0.9, 0.5, -0.25]))
    for a, b in zip(host.parameters(), device.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("generator", [*GENERATORS, "torch-chunks-v1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_updated_copy_is_what_update_writes(generator, dtype):
    """ZO-SGD-Conservative scores the weights an update would write: the same bits."""
    model = TiedLM().to(dtype)
    config = EngineConfig(generator=generator, chunk_size=50)
    engine = build_engine(list(model.parameters()), config)
    copies = [engine.updated_copy([1, 2], [0.5, -0.25], 0.9, i) for i in range(5)]
    engine.update([1, 2], [0.5, -0.25], decay=0.9)
    for param, copy_ in zip(model.parameters(), copies, strict=True):
        assert torch.equal(param, copy_)
    assert engine.updated_copy([1], [0.0], 1.0, 0) is None


def test_generator_choice_and_the_recorded_one():
    assert resolve_generator(EngineConfig(), "cpu") == "philox-ieee"
    assert resolve_generator(EngineConfig(), "cuda") == "philox"
    assert resolve_generator(EngineConfig(generator="philox"), "cpu") == "philox"
    assert engine_for(TiedLM(), generator="philox").generator_name == "philox"
    legacy = build_engine(list(TiedLM().parameters()), EngineConfig(generator="torch-chunks-v1"))
    assert isinstance(legacy, EngineV1)
    assert recorded_generator({"engine_version": "1"}) == "torch-chunks-v1"
    assert recorded_generator({"engine_version": "2", "generator": "philox"}) == "philox"
    with pytest.raises(ValueError, match="engine version '3'.*other directions"):
        recorded_generator({"engine_version": "3"})
    with pytest.raises(ValueError, match="generator 'mt'.*does not have"):
        recorded_generator({"engine_version": "2", "generator": "mt"})
    with pytest.raises(ValueError, match="belongs to engine version '1'"):
        recorded_generator({"engine_version": "2", "generator": "torch-chunks-v1"})
    with pytest.raises(ValueError, match="names no direction generator"):
        recorded_generator({"engine_version": "2"})
    with pytest.raises(ValueError, match="choose one of"):
        EngineConfig(generator="mt")


def test_per_tensor_scales():
    model = TiedLM()
    engine = engine_for(model)
    scales = [0.0, 0.02, 0.0, 0.01, 0.03]
    with torch.no_grad(), engine.perturbed(5, scales):
        perturbed = model(IDS)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for index, param in enumerate(reference.parameters()):
            param.add_(scales[index] * engine.direction(5, index))
        expected = reference(IDS)
    torch.testing.assert_close(perturbed, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_are_bit_identical_after_perturbed_forwards(dtype, generator):
    model = TiedLM().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = engine_for(model, chunk_size=50, generator=generator, offload_threshold=0)
    with torch.no_grad():
        for sign in (1.0, -1.0):
            with engine.perturbed(3, sign * 1e-3):
                model(IDS)
        engine.update([3], [0.0], 1.0)  # an lr=0 step writes nothing
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("generator", GENERATORS)
def test_update_matches_manual_formula(generator):
    model = TiedLM()
    engine = engine_for(model, chunk_size=50, generator=generator)
    expected = [
        p.detach() * 0.9 + 0.5 * engine.direction(1, i) - 0.25 * engine.direction(2, i)
        for i, p in enumerate(model.parameters())
    ]
    engine.update([1, 2], [0.5, -0.25], decay=0.9)
    for param, reference in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.detach(), reference, rtol=1e-6, atol=1e-6)


def test_update_can_target_a_subset():
    model = TiedLM()
    before = [p.detach().clone() for p in model.parameters()]
    engine_for(model).update([1], [0.5], indices=[2])
    changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
    assert changed == [False, False, True, False, False]


def test_forward_that_raises_restores_weights():
    model = TiedLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = engine_for(model)
    bad = torch.tensor([[1000]])  # out-of-range id: the embedding raises after norm is hooked
    with pytest.raises(IndexError), torch.no_grad(), engine.perturbed(1, 0.1):
        model.proj(model.norm(torch.ones(1, 16)))
        model(bad)
    for name, param in model.named_parameters():
        assert param is dict(model.named_parameters())[name]
        assert torch.equal(param, before[name])
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_integer_tensors_are_refused():
    with pytest.raises(FrozenTensorError, match="quantized base stays frozen"):
        PerturbationEngine([torch.zeros(4, dtype=torch.uint8)])


def test_bad_engine_config():
    with pytest.raises(ValueError, match="choose one of"):
        EngineConfig(distribution="uniform")
    with pytest.raises(ValueError, match="bucket_size"):
        EngineConfig(bucket_size=-1)
    with pytest.raises(ValueError, match="prefetch"):
        EngineConfig(prefetch="yes")


def test_substituted_shows_replacements_only_during_the_forward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    weights = [model[0].weight, model[1].weight]
    engine = PerturbationEngine(weights)
    x = torch.randn(5, 4)
    before = [w.detach().clone() for w in weights]
    with engine.substituted(lambda i, w: w * 2 if i == 1 else None):
        out = model(x)
    expected = torch.nn.functional.linear(model[0](x), before[1] * 2, model[1].bias)
    torch.testing.assert_close(out, expected)
    assert all(torch.equal(w, b) for w, b in zip(weights, before, strict=True))
    assert model[1].weight is weights[1]  # the Parameter itself is back in place
