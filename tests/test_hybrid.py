"""Hybrid against references: its ZO part is ZO-SGD's, its first-order part torch.optim's."""

from __future__ import annotations

import copy
import fnmatch
import io

import pytest
import torch

import estimators
from estimators import ZOSGD, StepRecord
from estimators.hybrid import Hybrid, HybridConfig, HybridSplitError
from tests.test_engine import TiedLM
from tests.test_forward_grad import IDS, MASK, hf_loss
from zo.config import ConfigError, build
from zo.models import tiny_model

TRAINABLE = "*.layers.*"
FIRST_ORDER = ["*.layers.1.*"]


def trainable_llama(seed: int = 0):
    model, _ = tiny_model("llama", seed=seed)
    named = [(n, p) for n, p in model.named_parameters() if fnmatch.fnmatchcase(n, TRAINABLE)]
    chosen = {id(p) for _, p in named}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return model, named


def is_first_order(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in FIRST_ORDER)


REFERENCES = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, weight_decay=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
}


@pytest.mark.parametrize("first_order_optimizer", sorted(REFERENCES))
def test_parts_equal_zo_sgd_and_torch_optimizer_on_the_same_batches(first_order_optimizer):
    model, named = trainable_llama()
    hybrid = Hybrid(
        named,
        first_order=FIRST_ORDER,
        lr=1e-3,
        eps=1e-3,
        queries=2,
        first_order_optimizer=first_order_optimizer,
        first_order_lr=1e-2,
        first_order_weight_decay=0.01,
        seed=7,
    )
    reference, ref_named = trainable_llama()
    zeroth = [(n, p) for n, p in ref_named if not is_first_order(n)]
    first = [p for n, p in ref_named if is_first_order(n)]
    zo_sgd = ZOSGD(zeroth, lr=1e-3, eps=1e-3, queries=2, seed=7)
    first_order = REFERENCES[first_order_optimizer](first)
    for _ in range(3):  # later steps see both parts' earlier updates
        hybrid.step(lambda: hf_loss(model))
        # the reference: gradients of the first-order part with the ZO part frozen, then
        # ZO-SGD over the ZO part with the first-order part frozen, both at the same weights
        for _, p in zeroth:
            p.requires_grad_(False)
        first_order.zero_grad()
        hf_loss(reference).backward()
        for _, p in zeroth:
            p.requires_grad_(True)
        zo_sgd.step(lambda: hf_loss(reference))
        first_order.step()
        assert hybrid.zo_record.scalars == zo_sgd.last_record.scalars
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_backward_reaches_only_the_first_order_part_and_flags_are_restored():
    model, named = trainable_llama()
    hybrid = Hybrid(named, first_order=FIRST_ORDER, lr=1e-3, seed=0)
    hybrid.estimate(lambda: hf_loss(model))
    for n, p in named:
        assert (p.grad is not None) == is_first_order(n), n
        assert p.requires_grad, n
    hybrid.step()
    assert all(p.grad is None for _, p in named)  # freed after the step


def test_accumulated_micro_batches_average_both_parts():
    model, named = trainable_llama()
    hybrid = Hybrid(named, first_order=FIRST_ORDER, lr=1e-3, first_order_lr=1e-2, seed=2)
    reference, ref_named = trainable_llama()
    zo_sgd = ZOSGD([(n, p) for n, p in ref_named if not is_first_order(n)], lr=1e-3, seed=2)
    sgd = torch.optim.SGD([p for n, p in ref_named if is_first_order(n)], lr=1e-2)
    halves = [lambda m, s=s: hf_loss_rows(m, s) for s in (slice(0, 1), slice(1, 2))]
    for half in halves:
        hybrid.estimate(lambda half=half: half(model))
    hybrid.step()
    for n, p in ref_named:
        p.requires_grad_(is_first_order(n))
    for half in halves:
        (half(reference) / 2).backward()
    for _, p in ref_named:
        p.requires_grad_(True)
    for half in halves:
        zo_sgd.estimate(lambda half=half: half(reference))
    zo_sgd.step()
    sgd.step()
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


def hf_loss_rows(model, rows: slice) -> torch.Tensor:
    ids, mask = IDS[rows], MASK[rows]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    )


def test_no_trajectory_but_the_zo_part_replays_from_its_record():
    model, named = trainable_llama()
    hybrid = Hybrid(named, first_order=FIRST_ORDER, lr=1e-3, seed=5)
    records = []
    for _ in range(2):
        hybrid.step(lambda: hf_loss(model))
        assert hybrid.last_record is None
        records.append(StepRecord.from_dict(hybrid.zo_record.to_dict()))
    replica, replica_named = trainable_llama()
    replay = ZOSGD([(n, p) for n, p in replica_named if not is_first_order(n)], seed=5)
    for record in records:
        replay.apply_record(record)
    for (n, p), q in zip(model.named_parameters(), replica.parameters(), strict=True):
        assert torch.equal(p, q) != is_first_order(n), n


def test_state_dict_resume_is_bit_exact_with_first_order_state():
    def build_pair():
        model, named = trainable_llama()
        return model, Hybrid(
            named, first_order=FIRST_ORDER, lr=1e-3, first_order_optimizer="adamw", seed=3
        )

    model, hybrid = build_pair()
    for _ in range(4):
        hybrid.step(lambda: hf_loss(model))
    uninterrupted = copy.deepcopy(model.state_dict())

    model, hybrid = build_pair()
    for _ in range(2):
        hybrid.step(lambda: hf_loss(model))
    buffer = io.BytesIO()
    torch.save({"weights": model.state_dict(), "optimizer": hybrid.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model, resumed = build_pair()
    resumed_model.load_state_dict(saved["weights"])
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.first.state  # AdamW's moments came back
    for _ in range(2):
        resumed.step(lambda: hf_loss(resumed_model))
    for key, value in resumed_model.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key

    other = Hybrid(trainable_llama()[1], first_order=["*.layers.0.*"], seed=3)
    with pytest.raises(ValueError, match="first_order"):
        other.load_state_dict(saved["optimizer"])


def test_lr_schedules_reach_both_parts_through_param_groups():
    model, named = trainable_llama()
    hybrid = Hybrid(named, first_order=FIRST_ORDER, lr=1e-3, first_order_lr=1e-2)
    assert [g["lr"] for g in hybrid.param_groups] == [1e-3, 1e-2]
    for group in hybrid.param_groups:
        group["lr"] = 0.0
    before = copy.deepcopy(model.state_dict())
    hybrid.step(lambda: hf_loss(model))
    assert hybrid.zo_record.lrs == [0.0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    hybrid.load_state_dict(hybrid.state_dict())
    assert hybrid.param_groups[0] is hybrid.zeroth.param_groups[0]


def test_bad_splits_are_clear_errors():
    named = list(TiedLM().named_parameters())
    with pytest.raises(HybridSplitError, match="named parameters"):
        Hybrid(TiedLM().parameters(), first_order=["head.*"])
    with pytest.raises(HybridSplitError, match=r"\['nothing\.\*'\] match no trainable"):
        Hybrid(named, first_order=["proj.*", "nothing.*"])
    with pytest.raises(HybridSplitError, match="every trainable tensor.*sgd"):
        Hybrid(named, first_order=["*"])
    with pytest.raises(HybridSplitError, match="with none it is zo_sgd"):
        Hybrid(named, first_order=[])
    with pytest.raises(HybridSplitError, match="adamw"):
        Hybrid(named, first_order=["proj.*"], first_order_optimizer="lomo")
    with pytest.raises(ConfigError, match="first_order_optimizer 'lomo' is unknown"):
        build(HybridConfig, {"first_order": ["proj.*"], "first_order_optimizer": "lomo"}, "e")


def test_registered_and_built_from_its_config():
    spec = estimators.get_estimator("hybrid")
    assert not spec.traits.zeroth_order and spec.traits.grad_accum
    config = build(HybridConfig, {"first_order": ["proj.*"], "first_order_lr": "1e-2"})
    optimizer = estimators.build_estimator("hybrid", TiedLM().named_parameters(), config, seed=4)
    assert isinstance(optimizer, Hybrid) and optimizer.zeroth.run_seed == 4
    assert [n for g in optimizer.first.param_groups for n in g["param_names"]] == [
        "proj.weight",
        "proj.bias",
    ]
