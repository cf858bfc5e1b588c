"""Per-group settings from YAML (``estimator.param_groups``): grouping, errors, the loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tests.test_cli import SMOKE, assert_same_tensors, step_records, trained, zo
from zo.config import ConfigError
from zo.trainable import TrainableSet, param_groups

NAMES = ["model.layers.0.q.weight", "model.layers.0.v.weight", "model.layers.1.q.weight", "head"]


def trainable() -> TrainableSet:
    return TrainableSet(list(NAMES), [nn.Parameter(torch.zeros(2)) for _ in NAMES])


def names_of(group) -> list[str]:
    return [name for name, _ in group["params"]]


def test_first_matching_group_takes_a_tensor_and_the_rest_keep_the_defaults():
    groups = param_groups(
        trainable(),
        [{"match": ["*.layers.0.*"], "lr": "1e-6"}, {"match": "*.q.weight", "eps": 0.01}],
    )
    assert [names_of(g) for g in groups] == [NAMES[:2], [NAMES[2]], [NAMES[3]]]
    assert groups[0]["lr"] == 1e-6 and groups[1]["eps"] == 0.01  # YAML's "1e-6" is a string
    assert set(groups[2]) == {"params"}
    ungrouped = trainable()
    pairs = param_groups(ungrouped, None)  # no groups: the named tensors, in order
    assert [n for n, _ in pairs] == NAMES
    assert all(p is q for (_, p), q in zip(pairs, ungrouped.params, strict=True))


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ({"match": "*"}, "must be a list of mappings"),
        ([{"lr": 1.0}], "give `match`"),
        ([{"match": ["nothing.*"]}], r"match no trainable tensor.*model.layers.0.q.weight"),
        ([{"match": ["*"]}, {"match": ["head"]}], r"param_groups\[1\].*already in an earlier"),
        ([{"match": ["*"], "params": []}], "chosen by `match`"),
        ([{"match": ["*"], "lr": "fast"}], r"param_groups\[0\].lr: 'fast' is not a number"),
    ],
)
def test_bad_groups_are_config_errors(specs, message):
    with pytest.raises(ConfigError, match=message):
        param_groups(trainable(), specs)


def smoke_with(tmp_path, estimator: dict) -> str:
    config = yaml.safe_load(Path(SMOKE).read_text())
    if "name" in estimator:  # another estimator: none of the smoke config's settings
        config["estimator"] = {}
    config["estimator"].update(estimator)
    config["train"].update(steps=4, save_every=2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_group_with_lr_zero_stays_put_while_the_rest_trains_and_replays(tmp_path):
    frozen_layer = {"param_groups": [{"match": ["*layers.0.*"], "lr": 0.0}]}
    out = tmp_path / "run"
    assert (
        zo(
            "train",
            "--config",
            smoke_with(tmp_path, frozen_layer),
            f"train.out={out}",
            "train.progress=false",
        )
        == 0
    )
    reference = tmp_path / "plain"
    assert (
        zo(
            "train",
            "--config",
            smoke_with(tmp_path, {}),
            f"train.out={reference}",
            "train.progress=false",
        )
        == 0
    )
    grouped, plain = trained(out), trained(reference)
    from zo.models import load_model

    start = dict(load_model("tiny-llama")[0].named_parameters())
    for name, tensor in grouped.items():
        if ".layers.0." in name:
            assert torch.equal(tensor, start[name].detach()), name
        else:
            assert not torch.equal(tensor, start[name].detach()), name
    assert any(not torch.equal(plain[n], start[n].detach()) for n in plain if ".layers.0." in n)
    assert zo("replay", str(out), "--out", str(tmp_path / "replayed")) == 0
    from safetensors.torch import load_file

    assert_same_tensors(load_file(str(tmp_path / "replayed" / "trainable.safetensors")), grouped)


def test_per_block_eps_for_block_zo_from_yaml(tmp_path):
    settings = {
        "name": "block_zo",
        "param_groups": [{"match": ["*layers.1.*"], "eps": 1.0e-2, "lr": 2.0e-3}],
    }
    out = tmp_path / "blocks"
    assert (
        zo(
            "train",
            "--config",
            smoke_with(tmp_path, settings),
            f"train.out={out}",
            "train.progress=false",
        )
        == 0
    )
    records = step_records(out)
    assert [len(r["lrs"]) for r in records] == [2] * 4  # the layer-1 group and the rest
    assert records[0]["lrs"][0] == pytest.approx(2.0e-3)


def test_a_setting_the_estimator_has_not_is_exit_2(tmp_path, capsys):
    settings = {"name": "sgd", "lr": 0.1, "param_groups": [{"match": ["*"], "eps": 1.0e-3}]}
    out = tmp_path / "sgd"
    code = zo(
        "train",
        "--config",
        smoke_with(tmp_path, settings),
        f"train.out={out}",
        "train.progress=false",
    )
    assert code == 2
    assert "['eps'] are not per-group settings of SGD" in capsys.readouterr().err
