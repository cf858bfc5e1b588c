"""A ZO step on the engine dispatches nothing that waits for the device, and few operators.

Counted with a dispatch mode (:mod:`zo.opcount`) on the CPU: the operators a CUDA step would
launch are the same, and those that make the host wait for the device (``nonzero``,
``.item()``, data-dependent shapes) show up by name wherever they run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from estimators import ZOSGD
from tests.test_engine import TiedLM
from tests.test_zo_sgd import lm_loss
from zo.engine import EngineConfig
from zo.opcount import OpCounter


def counted_step(model: nn.Module, closure, **engine) -> OpCounter:
    # one drawing thread: a dispatch mode sees only the thread it runs in
    config = EngineConfig(threads=1, **engine)
    optimizer = ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, engine=config)
    optimizer.step(closure)  # the first step learns the bucket plan
    with OpCounter() as counter:
        optimizer.step(closure)
    return counter


@pytest.mark.parametrize("generator", ["philox", "philox-ieee", "torch-blocks"])
@pytest.mark.parametrize("offload_threshold", [0, 1 << 22])
def test_a_zo_sgd_step_dispatches_no_operator_that_waits_for_the_device(
    generator, offload_threshold
):
    """Perturbed forwards (weight copies, and with threshold 0 the output-side embedding
    rows and head) and the update, its coefficients computed on the device. The scalars are
    read once after the update (``tolist``, which a CPU run does not dispatch).

    torch-blocks on a CPU reads the batch's token ids on the host to draw only the blocks they
    touch -- no device there; on CUDA it draws every block under masks instead."""
    model = TiedLM(vocab=300, dim=32)
    counter = counted_step(
        model, lambda: lm_loss(model), generator=generator, offload_threshold=offload_threshold
    )
    assert counter.result.syncs == []
    assert counter.result.total > 0


def test_the_counter_catches_what_version_1_did():
    """The check above is not vacuous: version 1's output-side embedding used ``nonzero``,
    and a closure that reads its loss with ``.item()`` is caught too."""
    model = TiedLM(vocab=300, dim=32)
    legacy = counted_step(
        model, lambda: lm_loss(model), generator="torch-chunks-v1", offload_threshold=0
    )
    assert "nonzero" in {name for _, name in legacy.result.syncs}
    reading = counted_step(model, lambda: lm_loss(model).item())
    assert "_local_scalar_dense" in {name for _, name in reading.result.syncs}


class Stack(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.square().mean()


def test_step_operators_beyond_two_forwards_do_not_grow_with_the_tensor_count():
    """Few kernels per pass: with philox a bucket's copies are one operator and the update
    one more, so 8 or 80 trainable tensors cost the same operators beyond two forwards."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    extra = {}
    for width in (4, 40):
        model = Stack(width)
        with torch.no_grad(), OpCounter() as forward:
            model(x)
        counter = counted_step(model, lambda model=model: model(x), generator="philox")
        extra[width] = counter.result.total - 2 * forward.result.total
        assert counter.result.compute["zo.philox_axpz"] == 3  # two forwards, one update
    assert extra[40] == extra[4] < 40
