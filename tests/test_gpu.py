"""The engine's guarantees on CUDA: functional = dense, exact restore, bit-exact replay."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from estimators import ZOSGD, StepRecord
from tests.test_engine import IDS, TiedLM, dense_reference, engine_for
from tests.test_zo_sgd import lm_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("offload_threshold", [1 << 22, 0])
def test_perturbed_forward_equals_dense_on_cuda(offload_threshold):
    model = TiedLM().cuda()
    engine = engine_for(model, offload_threshold=offload_threshold)
    ids = IDS.cuda()
    with torch.no_grad():
        with engine.perturbed(3, 0.01):
            perturbed = model(ids)
        expected = dense_reference(model, engine, 3, 0.01)(ids)
    torch.testing.assert_close(perturbed, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lr_zero_step_restores_bit_exactly_on_cuda(dtype):
    model = TiedLM().cuda().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = ZOSGD(model.parameters(), lr=0.0, eps=1e-2)
    optimizer.step(lambda: lm_loss(model, IDS.cuda()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_replay_is_bit_exact_on_cuda():
    model = TiedLM().cuda()
    replica = copy.deepcopy(model)
    optimizer = ZOSGD(model.parameters(), lr=1e-2, seed=9, weight_decay=0.01)
    records = []
    for _ in range(3):
        optimizer.step(lambda: lm_loss(model, IDS.cuda()))
        records.append(StepRecord.from_dict(optimizer.last_record.to_dict()))
    replay = ZOSGD(replica.parameters(), lr=1.0, seed=9)
    for record in records:
        replay.apply_record(record)
    for p, q in zip(model.parameters(), replica.parameters(), strict=True):
        assert torch.equal(p, q)


# ------------------------------------------------------------ the 8 GiB path's pieces on CUDA
def _nf4_cuda_linear(compute_dtype, out_features=96, in_features=128, seed=0):
    from zo.quant import quantize_linear

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.2
    return quantize_linear(weight, None, compute_dtype=compute_dtype, device="cuda")


def _quantized_tiny_with_deltas(tmp_path, compute_dtype=torch.float32):
    from tests.test_sparse_delta import layer_mask, random_values
    from tests.tiny import fresh_tiny
    from zo.quant import load_quantized
    from zo.sparse_delta import apply_sparse_deltas

    source, _ = fresh_tiny()
    source.save_pretrained(tmp_path)
    model = load_quantized(tmp_path, compute_dtype=compute_dtype, attn="eager", device="cuda")
    named = apply_sparse_deltas(model, layer_mask(model))
    with torch.no_grad():
        for i, (_, p) in enumerate(named):
            p.copy_(random_values(p.numel(), i, 0.05).cuda())
    return model, named


def _cuda_lm_loss(model):
    from tests.tiny import IDS as LM_IDS

    ids = LM_IDS.cuda()

    def loss() -> torch.Tensor:
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return loss


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_sparse_delta_over_nf4_on_cuda_equals_dequantized_weight_plus_delta(compute_dtype):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from tests.test_sparse_delta import dense_delta, random_indices, random_values
    from zo.sparse_delta import SparseDeltaLinear, add_sparse_delta

    base = _nf4_cuda_linear(compute_dtype)
    indices = random_indices(96 * 128, 0.05, 1)
    values = random_values(indices.numel(), 2)
    layer = SparseDeltaLinear(base, indices.cuda(), values.cuda())
    x = torch.randn(4, 9, 128, device="cuda", dtype=compute_dtype)
    weight = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    weight += dense_delta(indices, values, (96, 128)).cuda()
    with torch.no_grad():
        out = layer(x)
        graph_path = add_sparse_delta(x, base(x), layer.values, layer.rows, layer.cols)
    assert out.dtype == compute_dtype
    loose = compute_dtype != torch.float32
    tolerance = dict(rtol=3e-2, atol=3e-2) if loose else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.float(), F.linear(x.float(), weight), **tolerance)
    # the no-grad token chunks add what the one-block path adds (CUDA atomics: up to rounding)
    torch.testing.assert_close(out, graph_path, **(dict(rtol=1e-2, atol=1e-2) if loose else {}))


def test_zo_step_over_nf4_sparse_model_on_cuda_restores_and_moves_only_values(tmp_path):
    pytest.importorskip("bitsandbytes")
    import estimators

    model, named = _quantized_tiny_with_deltas(tmp_path, torch.bfloat16)
    loss = _cuda_lm_loss(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    frozen = estimators.build_estimator("zo_sgd", named, lr=0.0, eps=1e-3)
    frozen.step(loss)
    assert frozen.last_record.scalars[0] != 0.0
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    optimizer = estimators.build_estimator("zo_sgd", named, lr=1e-2, eps=1e-3, seed=4)
    optimizer.step(loss)
    record = optimizer.last_record
    for i, (name, p) in enumerate(named):  # values moved along the regenerated direction
        direction = optimizer.engine.direction(record.seeds[0], i).to(p.device)
        expected = before[name] - 1e-2 * record.scalars[0] * direction
        torch.testing.assert_close(p.detach(), expected)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(before[n], t)}
    assert changed and all(n.endswith(".values") for n in changed)


def test_forward_grad_through_nf4_sparse_model_on_cuda_equals_autograd(tmp_path):
    pytest.importorskip("bitsandbytes")
    from zo.engine import PerturbationEngine
    from zo.jvp import directional_derivative

    model, named = _quantized_tiny_with_deltas(tmp_path)
    loss = _cuda_lm_loss(model)
    engine = PerturbationEngine([p for _, p in named])
    _, derivative = directional_derivative(loss, engine, seed=5)
    grads = torch.autograd.grad(loss(), [p for _, p in named])
    expected = sum(
        float((g * engine.direction(5, i).to(g.device)).sum()) for i, g in enumerate(grads)
    )
    assert derivative != 0.0
    assert derivative == pytest.approx(expected, rel=1e-3)


def test_sensitive_mask_hooks_on_cuda_equal_the_full_gradient_reference():
    from tests.test_masks import SEQ, global_topk
    from zo.calibration import read_texts, tokenize_chunks
    from zo.masks import budget, build_mask, mask_targets
    from zo.models import tiny_model

    model, tokenizer = tiny_model("llama", seed=0)
    model.cuda()
    chunks = tokenize_chunks(read_texts(), tokenizer, SEQ, max_tokens=12 * SEQ)
    result = build_mask(
        model, tokenizer, density=0.01, seq_len=SEQ, batch_size=3, max_tokens=12 * SEQ
    )
    targets = mask_targets(model)
    scores = {name: torch.zeros(p.numel(), device="cuda") for name, p in targets}
    for ids in chunks.split(3):
        model.zero_grad(set_to_none=True)
        ids = ids.cuda()
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in targets:
            scores[name] += p.grad.float().reshape(-1).square()
    model.zero_grad(set_to_none=True)
    total = sum(p.numel() for _, p in targets)
    expected = global_topk({n: s.cpu() for n, s in scores.items()}, budget(0.01, total))
    assert sorted(result.indices) == sorted(expected)
    for name, indices in result.indices.items():
        assert torch.equal(indices.cpu(), expected[name]), name
