"""Non-finite settings are refused up front; a diverging run stops with exit code 3 and never
saves non-finite weights; `train.on_nonfinite=skip` skips a step replayably; a flat loss warns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import estimators
import zo.train as loop
from estimators.settings import HYPERPARAMETER_RANGES
from tests.test_cli import SMOKE, step_records, trained, zo
from tests.tiny import fresh_tiny
from zo.commands.common import DIVERGED_EXIT, EXIT_CODES
from zo.divergence import DIVERGED_EXIT as DIVERGED

QUIET = ["train.progress=false", "train.eval_before=false", "task.eval_limit=4"]

# ---------------------------------------------------------------------- settings

# a value outside each range that is still a finite number
OUT_OF_RANGE = {
    "lr": -1.0,
    "first_order_lr": -1.0,
    "eps": 0.0,
    "scale_floor": 0.0,
    "weight_decay": -0.1,
    "first_order_weight_decay": -0.1,
    "beta1": 1.0,
    "beta2": -0.5,
    "momentum": 1.0,
    "adam_eps": 0.0,
    "clip_grad_norm": 0.0,
    "clip_grad_value": -1.0,
    "initial_loss_scale": 0.0,
    "min_loss_scale": -1.0,
    "queries": 0,
    "loss_scale_window": 0,
}
EXTRA = {"hybrid": {"first_order": ["model.norm.weight"]}}


def numeric_settings(name: str) -> list[str]:
    config = estimators.get_estimator(name).config_class()
    return [key for key in vars(config) if key in HYPERPARAMETER_RANGES]


def build(name: str, **settings):
    model, _ = fresh_tiny("llama")
    return estimators.build_estimator(
        name, list(model.named_parameters()), model=model, **EXTRA.get(name, {}), **settings
    )


def test_every_numeric_setting_has_a_range():
    for name in estimators.available_estimators():
        config = estimators.get_estimator(name).config_class()
        numeric = [k for k, v in vars(config).items() if type(v) in (int, float)]
        assert set(numeric) <= set(HYPERPARAMETER_RANGES), name
    assert set(OUT_OF_RANGE) == set(HYPERPARAMETER_RANGES)


@pytest.mark.parametrize("name", estimators.available_estimators())
def test_constructors_refuse_nan_infinite_and_out_of_range_settings(name):
    for key in numeric_settings(name):
        for bad in (math.nan, math.inf, -math.inf, OUT_OF_RANGE[key]):
            with pytest.raises(ValueError, match=rf"^{key} must be "):
                build(name, **{key: bad})


def write_config(tmp_path: Path, estimator: dict) -> Path:
    """The smoke config with another estimator section."""
    smoke = Path(SMOKE).read_text()
    head, _, rest = smoke.partition("estimator:\n")
    rest = rest[rest.index("train:") :]
    lines = "".join(f"  {key}: {json.dumps(value)}\n" for key, value in estimator.items())
    path = tmp_path / "config.yaml"
    path.write_text(f"{head}estimator:\n{lines}{rest}")
    return path


@pytest.mark.parametrize("name", ["zo_sgd", "zo_adam", "zo_sgd_momentum", "lomo", "hybrid"])
def test_configs_refuse_bad_settings_naming_the_key(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "load_base_model", _no_model)
    for key in numeric_settings(name):
        for bad in (".nan", ".inf", OUT_OF_RANGE[key]):
            config = write_config(tmp_path, {"name": name, **EXTRA.get(name, {}), key: bad})
            assert zo("train", "--config", str(config), f"train.out={tmp_path / 'run'}") == 2
            assert f"estimator.{key}" in capsys.readouterr().err, (key, bad)
    assert not (tmp_path / "run").exists()


def test_per_group_settings_are_checked_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "load_base_model", _no_model)
    groups = [{"match": ["*norm*"], "lr": ".nan"}, {"match": ["*"], "eps": -1.0e-3}]
    for position, group in enumerate(groups):
        config = write_config(tmp_path, {"name": "zo_sgd", "param_groups": [group]})
        assert zo("train", "--config", str(config), f"train.out={tmp_path / 'run'}") == 2
        assert f"estimator.param_groups[0].{list(group)[1]}" in capsys.readouterr().err, position


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded for a config that should have been refused")


# ---------------------------------------------------------------------- divergence


def test_an_overflowing_update_is_never_saved(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["estimator.lr=1.0e38", "train.save_every=1", *QUIET]
    assert zo("train", "--config", SMOKE, f"train.out={out}", *args) == DIVERGED
    error = capsys.readouterr().err
    assert "training diverged at step 0: the weights are non-finite" in error
    assert "lower estimator.lr (now estimator.lr=1e+38" in error
    assert not (out / "checkpoint").exists()  # the only checkpoint would have held inf


@pytest.fixture
def poisoned(monkeypatch):
    """Make chosen steps' batches give a NaN loss (or, ``weights=True``, also overwrite a
    trainable tensor with infinities): ``poisoned(steps, weights=False)``."""

    def poison(steps: set[int], weights: bool = False) -> None:
        original = loop.training_closure

        def closure_for(setup, examples, precision):
            closure = original(setup, examples, precision)
            step = setup.optimizer.step_count
            if step not in steps:
                return closure
            if weights:
                with torch.no_grad():
                    next(iter(setup.trainable.params)).fill_(math.inf)
            return lambda: closure() * math.nan  # the model runs, its loss is NaN

        monkeypatch.setattr(loop, "training_closure", closure_for)

    return poison


def test_a_nan_loss_stops_with_exit_3_keeping_the_finite_checkpoint(tmp_path, capsys, poisoned):
    out = tmp_path / "run"
    poisoned({5})
    args = [f"train.out={out}", "train.save_every=2", *QUIET]
    assert zo("train", "--config", SMOKE, *args) == DIVERGED_EXIT
    error = capsys.readouterr().err
    assert (
        "training diverged at step 5: the loss is non-finite while the weights are finite" in error
    )
    assert "the last checkpoint (step 4) holds finite weights" in error
    assert "train.on_nonfinite=skip" in error
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    assert all(bool(t.isfinite().all()) for t in trained(out).values())
    # resumed with skip, the run finishes; the skipped step replays as the same no-op
    assert zo("train", "--config", SMOKE, *args, "resume=true", "train.on_nonfinite=skip") == 0
    records = step_records(out)
    assert [r["step"] for r in records] == list(range(12))
    assert [r["step"] for r in records if "skipped" in r["extra"]] == [5]
    assert zo("replay", str(out), "--out", str(tmp_path / "replayed")) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["bit_identical_to_checkpoint"]


@pytest.mark.parametrize("estimator", ["zo_sgd", "zo_adam", "block_zo", "zo_sgd_conservative"])
def test_skipped_steps_change_nothing_and_replay(tmp_path, capsys, poisoned, estimator):
    out = tmp_path / "run"
    poisoned({3, 4, 9})
    args = [f"train.out={out}", "train.on_nonfinite=skip", f"estimator.name={estimator}"]
    assert zo("train", "--config", SMOKE, *args, "train.save_every=3", *QUIET) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 3
    assert [r["step"] for r in step_records(out) if "skipped" in r["extra"]] == [3, 4, 9]
    assert "step 3 skipped: non-finite loss" in capsys.readouterr().out
    assert zo("replay", str(out), "--out", str(tmp_path / "replayed")) == 0
    replayed = load_file(str(tmp_path / "replayed" / "trainable.safetensors"))
    assert all(replayed[name].equal(tensor) for name, tensor in trained(out).items())


@pytest.mark.parametrize("name", ["zo_sgd", "zo_adam", "zo_sgd_momentum", "block_zo"])
def test_skip_step_leaves_weights_and_state_alone(name):
    model, _ = fresh_tiny("llama")
    optimizer = estimators.build_estimator(
        name, list(model.named_parameters()), model=model, lr=1e-2
    )
    inputs = torch.randint(4, 200, (2, 8), generator=torch.Generator().manual_seed(0))

    def closure():
        return model(input_ids=inputs, labels=inputs).loss

    optimizer.step(closure)  # some optimizer state first
    weights = [p.detach().clone() for p in model.parameters()]
    state = {(id(p), k): v.clone() for p, s in optimizer.state.items() for k, v in s.items()}
    optimizer.estimate(closure)  # pending, then dropped by the skip
    record = optimizer.skip_step("test")
    assert record.step == 1 and record.extra == {"skipped": "test"} and optimizer.step_count == 2
    assert all(p.equal(w) for p, w in zip(model.parameters(), weights, strict=True))
    after = {(id(p), k): v for p, s in optimizer.state.items() for k, v in s.items()}
    assert after.keys() == state.keys() and all(after[k].equal(v) for k, v in state.items())
    optimizer.step(closure)  # the next step runs as usual
    assert optimizer.last_record.step == 2 and "skipped" not in optimizer.last_record.extra


def test_a_first_order_estimator_stops_on_a_nan_loss_too(tmp_path, capsys, poisoned):
    poisoned({2})
    config = write_config(tmp_path, {"name": "sgd", "lr": 0.01})
    args = [f"train.out={tmp_path / 'run'}", "train.save_every=2", *QUIET]
    assert zo("train", "--config", str(config), *args) == DIVERGED_EXIT
    error = capsys.readouterr().err
    assert (
        "training diverged at step 2: the loss is non-finite while the weights are finite" in error
    )
    assert "the last checkpoint (step 2) holds finite weights" in error


def test_weights_turned_non_finite_stop_even_when_skipping(tmp_path, capsys, poisoned):
    out = tmp_path / "run"
    poisoned({6}, weights=True)
    args = [f"train.out={out}", "train.on_nonfinite=skip", "train.save_every=2", *QUIET]
    assert zo("train", "--config", SMOKE, *args) == DIVERGED_EXIT
    error = capsys.readouterr().err
    assert "training diverged at step 6: the weights are non-finite (model.embed_tokens" in error
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 6
    assert all(bool(t.isfinite().all()) for t in trained(out).values())


def test_skipping_every_step_is_not_recovery(tmp_path, capsys, poisoned):
    poisoned(set(range(100)))
    args = [f"train.out={tmp_path / 'run'}", "train.on_nonfinite=skip", "train.steps=30", *QUIET]
    assert zo("train", "--config", SMOKE, *args) == DIVERGED_EXIT
    assert "10 steps in a row were skipped" in capsys.readouterr().err


def test_skip_is_refused_where_it_cannot_be_replayed(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, {"name": "sgd"})
    out = f"train.out={tmp_path / 'run'}"
    assert zo("train", "--config", str(config), out, "train.on_nonfinite=skip") == 2
    assert "only zeroth-order estimators" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert zo("train", "--config", SMOKE, out, "train.on_nonfinite=skip") == 2
    assert "train.on_nonfinite=skip is for one process" in capsys.readouterr().err


def test_a_collapsed_run_warns_once_that_its_gradient_is_zero(tmp_path, capsys):
    # fp32, lr=1e20: one step blows the weights up, the loss sits at ln 2 and no longer
    # moves under a perturbation of eps; the run finishes, but says so
    out = tmp_path / "run"
    assert zo("train", "--config", SMOKE, f"train.out={out}", "estimator.lr=1e20", *QUIET) == 0
    printed = capsys.readouterr().out
    assert printed.count("the projected gradient was exactly 0 for 5 steps in a row") == 1
    assert "estimator.lr=1e+20, estimator.eps=0.001, model.dtype=float32" in printed


def test_the_exit_code_is_documented():
    assert DIVERGED_EXIT == DIVERGED == 3
    assert "3  training diverged" in EXIT_CODES
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "exit code 3" in readme and "train.on_nonfinite" in readme
