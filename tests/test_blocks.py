"""Blocks found by structure, and checkpointing that changes memory, not gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zo.blocks import NoBlocksError, checkpoint_blocks, decoder_blocks
from zo.models import FAMILIES, tiny_model


def _loss(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([list(b"the film was great and long")] * 2) + 3
    ids = ids.clamp(max=len(tokenizer) - 1)
    return model(input_ids=ids).logits.float().logsumexp(-1).mean()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_blocks_are_the_decoder_layers_of_every_family(family: str) -> None:
    model, _ = tiny_model(family)
    blocks = decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert len({type(b) for b in blocks}) == 1
    assert "Layer" in type(blocks[0]).__name__


def test_a_model_without_repeated_layers_has_no_blocks() -> None:
    with pytest.raises(NoBlocksError, match="no nn.ModuleList"):
        decoder_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def _saved_bytes(model, tokenizer) -> tuple[int, dict[str, torch.Tensor]]:
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, tokenizer)
    loss.backward()
    return saved, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_checkpointing_keeps_gradients_and_saves_fewer_activations(family: str) -> None:
    model, tokenizer = tiny_model(family)
    plain_saved, plain_grads = _saved_bytes(model, tokenizer)
    assert checkpoint_blocks(model) == model.config.num_hidden_layers
    assert checkpoint_blocks(model) == 0  # idempotent
    assert not model.training  # eval mode: no dropout, unlike HF's own switch
    saved, grads = _saved_bytes(model, tokenizer)
    assert saved < plain_saved
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    with torch.no_grad():  # inference is untouched
        assert _loss(model, tokenizer).isfinite()
