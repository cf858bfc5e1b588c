"""The engine's guarantees on CUDA: functional = dense, exact restore, bit-exact replay."""

from __future__ import annotations

import copy

import pytest
import torch

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
