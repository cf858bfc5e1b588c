"""Offloaded ZO (blocks at home, copied per layer call) against the plain run, bit for bit."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from estimators.zo_adam import ZOAdam
from estimators.zo_sgd import ZOSGD
from estimators.zo_variants import ZOSGDConservative
from tests.test_cli import SMOKE, assert_same_tensors, step_records, trained, zo
from tests.tiny import fresh_tiny
from zo.blocks import decoder_blocks
from zo.config import load_config
from zo.engine import EngineConfig
from zo.offload import offload_blocks
from zo.train import build_setup

IDS = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(5))


def run(model, steps: int = 3, lr: float = 1e-2, estimator=ZOSGD, **options) -> list:
    engine = EngineConfig(threads=1)
    optimizer = estimator(model.parameters(), lr=lr, eps=1e-3, seed=11, engine=engine, **options)
    records = []
    for _ in range(steps):
        optimizer.step(lambda: model(input_ids=IDS, labels=IDS).loss)
        records.append(optimizer.last_record)
    return records


@pytest.mark.parametrize(
    ("estimator", "prefetch"),
    [(ZOSGD, 1), (ZOSGD, 2), (ZOSGD, 5), (ZOAdam, 1), (ZOSGDConservative, 1)],
)
def test_offloaded_zo_equals_the_plain_run_bit_for_bit(estimator, prefetch):
    """Conservative ZO-SGD with weight decay evaluates its candidate updates through the
    engine's substitution (the other path a slot's contents come from)."""
    options = {"lr": 1e-3, "weight_decay": 0.5} if estimator is ZOSGDConservative else {}
    base, _ = fresh_tiny("llama")
    base.eval()
    plain, offloaded = copy.deepcopy(base), copy.deepcopy(base)
    streaming = offload_blocks(offloaded, torch.device("cpu"), prefetch)
    reference = run(plain, estimator=estimator, **options)
    records = run(offloaded, estimator=estimator, **options)
    assert streaming.copies > 0  # every block layer crossed the (simulated) boundary
    assert [r.to_dict() for r in records] == [r.to_dict() for r in reference]
    for (name, a), (_, b), (_, c) in zip(
        plain.named_parameters(), offloaded.named_parameters(), base.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
        assert not torch.equal(b, c), name  # trained, at home


def test_offloaded_forwards_leave_the_stored_weights_untouched():
    model, _ = fresh_tiny("llama")
    model.eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    objects = {name: id(p) for name, p in model.named_parameters()}
    offload_blocks(model, torch.device("cpu"))
    run(model, steps=2, lr=0.0)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert id(param) == objects[name], name  # no per-call copy left in a module


@pytest.mark.parametrize(
    ("trainable", "offload"),
    [
        ([], ["train.parallel=offload"]),
        # every trainable tensor (the adapters) lives in a block: the engine sees none itself
        (["trainable.kind=lora"], ["train.parallel=offload", "train.offload_prefetch=2"]),
    ],
)
def test_zo_train_parallel_offload_equals_the_plain_run(trainable, offload, tmp_path):
    steps = ["train.steps=4", "train.progress=false", "train.eval_before=false", *trainable]
    plain, offloaded = tmp_path / "plain", tmp_path / "offloaded"
    assert zo("train", "--config", SMOKE, f"train.out={plain}", *steps) == 0
    assert zo("train", "--config", SMOKE, f"train.out={offloaded}", *offload, *steps) == 0
    assert step_records(offloaded) == step_records(plain)
    assert_same_tensors(trained(offloaded), trained(plain))


# A device no tensor reports (a CPU tensor's device is plain ``cpu``): a move to it is told
# apart from a move home, which is to ``cpu``.
TRAINING_DEVICE = torch.device("cpu", 0)


def record_moves_to(device: torch.device, monkeypatch) -> list[torch.Tensor]:
    """Every tensor passed to ``Tensor.to(device)`` from now on (``Module.to`` goes through
    it too) and what it returned, kept alive so that no other tensor can reuse their memory."""
    moved = []
    to = torch.Tensor.to

    def recording(self, *args, **kwargs):
        result = to(self, *args, **kwargs)
        targets = [*args, *kwargs.values()]
        if any(isinstance(t, str | torch.device) and torch.device(t) == device for t in targets):
            moved.extend([self, result])
        return result

    monkeypatch.setattr(torch.Tensor, "to", recording)
    return moved


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_build_setup_offloaded_never_moves_a_block_weight_to_the_device(trainable, monkeypatch):
    """A model larger than the device loads: only what is outside the blocks (embeddings,
    norm, head, buffers) is moved to the device, and the trainable set (LoRA's drawn start
    values included) is the one the plain build makes."""
    config = load_config(SMOKE, ["train.parallel=offload", f"trainable.kind={trainable}"])
    plain = build_setup(config)
    moved = record_moves_to(TRAINING_DEVICE, monkeypatch)
    monkeypatch.setattr("zo.train.resolve_device", lambda name: TRAINING_DEVICE)
    placed = {}  # where each tensor's data is once placed (the estimator may re-seat them)

    def offload_and_look(model, *args):
        streaming = offload_blocks(model, *args)
        in_blocks = {id(p) for block in decoder_blocks(model) for p in block.parameters()}
        for name, param in model.named_parameters():
            placed[name] = (id(param) in in_blocks, param.data_ptr())
        placed.update({name: (False, b.data_ptr()) for name, b in model.named_buffers()})
        return streaming

    monkeypatch.setattr("zo.train.offload_blocks", offload_and_look)
    setup = build_setup(config, offload=True)
    moved_memory = {t.data_ptr() for t in moved}
    assert any(home for home, _ in placed.values()) and not all(h for h, _ in placed.values())
    for name, (home, memory) in placed.items():
        assert (memory in moved_memory) != home, name
    assert setup.trainable.names == plain.trainable.names
    assert_same_tensors(setup.trainable.state_dict(), plain.trainable.state_dict())


def test_offload_refuses_a_first_order_estimator_and_a_launcher(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--config", SMOKE, f"train.out={out}", "train.parallel=offload"]
    assert zo(*args, "estimator.name=adamw", "estimator.lr=1e-3") == 2
    assert "'adamw' cannot run offloaded" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert zo(*args) == 2
    assert "runs in one process, and 2 were launched" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("estimator.name=forward_grad", "'forward_grad' cannot run offloaded"),
        ("train.offload_prefetch=0", "train.offload_prefetch must be >= 1, got 0"),
        ("engine.generator=torch-chunks-v1", "torch-chunks-v1 (engine version 1) perturbs"),
    ],
)
def test_offload_refuses_what_it_cannot_stream_before_loading(setting, message, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", SMOKE, f"train.out={out}", "train.parallel=offload", setting]
    assert zo(*args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_asking_for_streams_without_cuda_says_once_that_the_host_is_the_device(monkeypatch):
    monkeypatch.setattr("zo.offload._told_host_is_device", False)
    with pytest.warns(UserWarning, match="the host is the device"):
        offload_blocks(fresh_tiny("llama")[0], torch.device("cpu"), streams="on")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        offload_blocks(fresh_tiny("llama")[0], torch.device("cpu"), streams="on")
        offload_blocks(fresh_tiny("llama")[0], torch.device("cpu"))  # auto: nothing to say


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_the_offload_plan_counts_the_slots_the_streamer_allocates(prefetch):
    import estimators
    from zo.memory.parallel import plan_offloaded
    from zo.memory.shapes import shape_from_hf_config
    from zo.memory.step import PlanRequest

    model, _ = fresh_tiny("llama")
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    streaming = offload_blocks(model, torch.device("cpu"), prefetch)
    allocated = sum(t.numel() * t.element_size() for s in streaming.slots for t in s.values())
    slots = min(prefetch + 1, 2)  # the tiny model has 2 blocks
    assert slots * layer <= allocated <= slots * (layer + 256 * len(streaming.entries[0]))

    deeper = {**model.config.to_dict(), "num_hidden_layers": 6}
    zo_sgd = estimators.get_estimator("zo_sgd").planned()
    request = PlanRequest(
        shape=shape_from_hf_config(deeper), estimator=zo_sgd, device="cpu", batch=2, seq_len=16
    )
    planned, one_more = plan_offloaded(request, prefetch), plan_offloaded(request, prefetch + 1)
    assert one_more.device_peak - planned.device_peak == layer  # one more slot
    assert one_more.host_bytes - planned.host_bytes == layer  # one more perturbed copy
    assert one_more.resident == planned.resident
