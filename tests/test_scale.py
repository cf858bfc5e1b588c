"""``estimator.scale=relative``: steps in each tensor's own units.

Checked against references: a reparametrisation by 50x (the forward compensating) leaves
the relative run's loss curve unchanged and changes the absolute one; one step equals a
naive step written here; scales are max(RMS, floor); a relative run replays and resumes bit
for bit, and a damaged record of its scales is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import estimators
from estimators.scaling import checksum, tensor_scales
from zo.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")
QUIET = ["train.progress=false", "estimator.scale=relative"]
FACTOR = 50.0


class ScaledLinear(nn.Module):
    """A linear layer that stores ``factor * W`` and divides it back in the forward."""

    def __init__(self, weight: torch.Tensor, factor: float):
        super().__init__()
        self.factor = factor
        self.weight = nn.Parameter(weight * factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight / self.factor)


def tiny_net(factor: float) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(16, 8, generator=generator) * 0.3
    net = nn.Sequential(ScaledLinear(first, factor), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        net[2].weight.copy_(torch.randn(1, 16, generator=generator) * 0.3)
        net[2].bias.zero_()
    return net


def loss_curve(name: str, scale: str, factor: float, steps: int = 30) -> list[float]:
    net = tiny_net(factor)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=generator)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    lr = {"zo_sgd": 0.05, "zo_sgd_momentum": 0.02, "zo_sgd_sign": 0.01}[name]
    # floor below every scale here (the bias starts at 0 and gets it, in both nets alike)
    config = estimators.get_estimator(name).config_class(
        lr=lr, eps=1e-3, scale=scale, scale_floor=1e-4
    )
    optimizer = estimators.build_estimator(name, net.parameters(), config, seed=3)
    return [optimizer.step(lambda: F.mse_loss(net(x), y)) for _ in range(steps)]


@pytest.mark.parametrize("name", ["zo_sgd", "zo_sgd_momentum", "zo_sgd_sign"])
def test_relative_steps_are_invariant_to_a_50x_reparametrisation(name):
    plain, rescaled = loss_curve(name, "relative", 1.0), loss_curve(name, "relative", FACTOR)
    # Same function, same coordinates u = W / RMS(W): equal up to fp32 rounding of the
    # 50x (W*50/50 is not exactly W), well under the 1e-4 relative tolerance.
    assert plain[-1] < plain[0]  # it learns, so the curve is worth comparing
    torch.testing.assert_close(torch.tensor(rescaled), torch.tensor(plain), rtol=1e-4, atol=0)
    absolute = loss_curve(name, "absolute", 1.0), loss_curve(name, "absolute", FACTOR)
    gap = max(abs(a - b) / a for a, b in zip(*absolute, strict=True))
    assert gap > 1e-2  # the absolute step moves the 50x tensor 50x less, relatively


def test_scales_are_each_tensors_rms_with_a_floor():
    tensors = [torch.randn(300, 7) * 3.0, torch.zeros(5), torch.full((4,), 1e-6)]
    scales = tensor_scales(tensors, "relative", 1e-3)
    assert scales[0] == pytest.approx(float(tensors[0].double().pow(2).mean().sqrt()), rel=1e-12)
    assert scales[1:] == [1e-3, 1e-3]
    assert tensor_scales(tensors, "absolute", 1e-3) is None
    with pytest.raises(ValueError, match="scale 'sideways' is unknown"):
        tensor_scales(tensors, "sideways", 1e-3)


def test_one_relative_step_equals_a_naive_step():
    net = tiny_net(FACTOR)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    y = x[:, :1]
    before = [p.detach().clone() for p in net.parameters()]
    scales = [max(float(p.double().pow(2).mean().sqrt()), 1e-4) for p in before]
    optimizer = estimators.ZOSGD(
        net.parameters(), lr=0.1, eps=1e-2, scale="relative", scale_floor=1e-4
    )
    seed = optimizer.seeds_for(0)[0]
    z = [optimizer.engine.direction(seed, i) for i in range(len(before))]

    def loss_at(sign: float) -> float:
        for p, w, s, d in zip(net.parameters(), before, scales, z, strict=True):
            p.data.copy_(w + sign * 1e-2 * s * d)
        return float(F.mse_loss(net(x), y))

    with torch.no_grad():
        g = (loss_at(1.0) - loss_at(-1.0)) / 2e-2
        loss_at(0.0)
    optimizer.step(lambda: F.mse_loss(net(x), y))
    for p, w, s, d in zip(net.parameters(), before, scales, z, strict=True):
        torch.testing.assert_close(p.detach(), w - 0.1 * s * g * d, rtol=1e-5, atol=1e-6)


def trained(run: Path) -> dict:
    return load_file(str(run / "checkpoint" / "trainable.safetensors"))


def test_relative_run_replays_and_resumes_bit_for_bit(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--config", SMOKE, f"train.out={full}", "train.steps=6", *QUIET]) == 0
    header = json.loads((full / "trajectory.jsonl").read_text().splitlines()[0])
    entry = header["tensor_scales"]
    assert len(entry["values"]) == len(header["trainable"]) and entry["sha256"] == checksum(
        entry["values"]
    )
    assert main(["replay", str(full), "--out", str(tmp_path / "replayed")]) == 0
    assert '"bit_identical_to_checkpoint": true' in capsys.readouterr().out
    assert main(["train", "--config", SMOKE, f"train.out={part}", "train.steps=3", *QUIET]) == 0
    resumed = ["train", "--config", SMOKE, f"train.out={part}", "train.steps=6", "resume=true"]
    assert main([*resumed, *QUIET]) == 0
    a, b = trained(full), trained(part)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    lines = (full / "trajectory.jsonl").read_text().splitlines()
    damaged = json.loads(lines[0])
    damaged["tensor_scales"]["values"][0] *= 2
    (full / "trajectory.jsonl").write_text("\n".join([json.dumps(damaged), *lines[1:]]) + "\n")
    assert main(["replay", str(full), "--out", str(tmp_path / "again")]) == 2
    # the line checksums of trajectory format 2 catch the edit first
    assert "trajectory.jsonl line 1" in capsys.readouterr().err
    # and the scales' own checksum refuses a header whose line checksum was redone
    from estimators.scaling import check_header_entry

    with pytest.raises(ValueError, match="sha256"):
        check_header_entry(
            damaged["tensor_scales"], json.loads(lines[0])["tensor_scales"]["values"], "header"
        )


def test_unknown_scale_is_a_usage_error(tmp_path, capsys):
    args = ["train", "--config", SMOKE, f"train.out={tmp_path / 'r'}", "estimator.scale=big"]
    assert main(args) == 2
    assert "scale 'big' is unknown" in capsys.readouterr().err
