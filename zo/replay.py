"""``zo replay``: a run's trained tensors rebuilt from its base model and trajectory alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import estimators
from estimators.scale_records import check_recorded_scales
from zo.run_config import load_run_config
from zo.run_directory import RunDirectory
from zo.train import (
    build_setup,
    resolve_device,
    resolve_estimator,
    trajectory_header,
    with_recorded_generator,
)
from zo.trajectory import (
    NothingToResumeError,
    ReplayError,
    RunDamagedError,
    header_mismatch,
    save_tensors_atomic,
)


def replay(
    run_dir: str | Path, out_dir: str | Path, log=print, compare: bool = True
) -> dict[str, Any]:
    """Rebuild the trained tensors from the base model and trajectory.jsonl alone.

    A damaged trajectory is refused (it would rebuild other weights). With ``compare`` the
    result is checked bit for bit against the newest checkpoint that verifies (its tensors:
    optimizer.pt is never read). Replay takes no lock and writes nothing into the run, so
    it may run beside a live one (see :meth:`RunDirectory.replay_sources`).
    """
    run = RunDirectory(run_dir)
    if not run.trajectory.exists() or not run.config.exists():
        raise NothingToResumeError(
            f"{run.path} is not a zo run (no config.yaml / trajectory.jsonl)"
        )
    out = Path(out_dir)
    if run.owns(out):
        raise ReplayError(f"--out {out} is the run's own folder or checkpoint; choose another")
    _check_out(out)
    config = load_run_config(run)
    spec, _ = resolve_estimator(config)
    if not spec.traits.replayable:
        raise ReplayError(
            f"{run.path} was trained with {spec.name}, which is not seed-replayable (its "
            "updates use gradients); load the run's checkpoint/ instead (zo eval --checkpoint)"
        )
    trajectory, saved = run.replay_sources(resolve_device(config.model.device), compare, log)
    config = with_recorded_generator(config, trajectory.header or {}, ReplayError, run.trajectory)
    setup = build_setup(config)
    check_recorded_scales(run.header(), run.trajectory, setup.optimizer, ReplayError)
    header, current = trajectory.header or {}, trajectory_header(setup)
    if header.get("model_hash") != current["model_hash"]:
        raise ReplayError(
            f"base model {config.model.name} hashes to {current['model_hash']}, the run "
            f"started from {header.get('model_hash')}: replay needs the same base weights"
        )
    mismatch = header_mismatch(header, current)
    if mismatch:
        raise ReplayError(
            f"{run.trajectory} line 1: {mismatch}; replay needs the run's own base model, "
            "trainable set, estimator and engine"
        )
    result: dict[str, Any] = {"steps": len(trajectory.steps)}
    for line, data in zip(trajectory.steps, trajectory.records(), strict=True):
        try:
            setup.optimizer.apply_record(estimators.StepRecord.from_dict(data))
        except TypeError as error:  # a format-1 record with fields missing or extra
            raise RunDamagedError(f"{run.trajectory} line {line.number}: {error}") from None
        if saved is not None and data["step"] + 1 == saved.step:
            replayed = setup.trainable.state_dict()
            result["checkpoint_step"] = saved.step
            result["bit_identical_to_checkpoint"] = replayed.keys() == saved.tensors.keys() and all(
                torch.equal(replayed[name], saved.tensors[name]) for name in replayed
            )
    out.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(setup.trainable.state_dict(), out / "trainable.safetensors")
    result["out"] = str(out / "trainable.safetensors")
    log(json.dumps(result))
    return result


def _check_out(out: Path) -> None:
    """``--out`` is a directory or can become one (checked before the model loads)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == out else f" ({existing}, on its path, is a file)"
        raise ReplayError(f"--out {out} is not a directory{where}: choose another --out")
