"""A run's checkpoint read for use by ``zo eval`` and ``zo export``.

Resume reads a checkpoint into the very setup that wrote it; evaluation and export read it
into a model built from a config that may differ (another file, overrides, another run's
checkpoint). Whatever does not fit -- an unreadable file, tensors of another trainable set,
another shape or dtype, another base model -- is refused here with a message that names the
run and the fix, before any tensor is copied.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from zo import checkpoint as checkpoints
from zo.checkpoint import Checkpoint
from zo.config import ConfigError, RunConfig
from zo.run_directory import RunDirectory
from zo.trainable import TrainableSet
from zo.trajectory import RunDamagedError

_SHOWN = 3  # names quoted per kind of difference


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


def open_run(run_dir: str | os.PathLike[str]) -> RunDirectory:
    """The run directory ``run_dir``, refused unless it holds a run's ``config.yaml``."""
    run = RunDirectory(Path(run_dir).expanduser())
    if not run.config.is_file():
        raise CheckpointError(
            f"{run.path} is not a zo run (no config.yaml there): pass the directory that "
            "`zo train` wrote (its train.out)"
        )
    return run


def checkpoint_source(path: str | os.PathLike[str]) -> tuple[RunDirectory, int | None]:
    """``--checkpoint PATH``: a run directory (its newest checkpoint that verifies), its
    ``checkpoint`` folder (the same), or a kept ``checkpoint-STEP`` (the newest one that
    verifies up to STEP). Returns the run and that bound."""
    folder = Path(path).expanduser()
    if folder.name == checkpoints.NEWEST:
        return RunDirectory(folder.parent), None
    if folder.name.startswith(f"{checkpoints.NEWEST}-") and (folder / checkpoints.STATE).is_file():
        try:
            return RunDirectory(folder.parent), checkpoints.read_state(folder).step
        except RunDamagedError as error:
            raise CheckpointError(str(error)) from None
    run = RunDirectory(folder)
    if not run.has_checkpoint():
        raise CheckpointError(
            f"--checkpoint {path}: no checkpoint there (pass a run directory or its "
            "checkpoint folder)"
        )
    return run, None


def require_checkpoint(run: RunDirectory) -> None:
    if not run.has_checkpoint():
        raise CheckpointError(
            f"{run.path} has no checkpoint yet (a run saves checkpoint/ every "
            "train.save_every steps and at its end): finish or resume the run first"
        )


def read_checkpoint(
    run: RunDirectory, device: torch.device | str = "cpu", at_most: int | None = None, log=print
) -> Checkpoint:
    """The run's newest checkpoint that verifies (up to step ``at_most``; its tensors, the
    optimizer state is not read); a missing, damaged or unreadable one is a
    :class:`CheckpointError`."""
    require_checkpoint(run)
    try:
        return run.newest_checkpoint(device, optimizer=False, log=log, at_most=at_most)[1]
    except RunDamagedError as error:
        raise CheckpointError(
            f"{error}; `zo replay {run.path} --out DIR --no-compare` rebuilds the trained "
            "tensors of a zeroth-order run from its trajectory"
        ) from None
    except Exception as error:  # safetensors, torch.load and json raise their own types
        raise CheckpointError(
            f"the checkpoint in {run.checkpoint_dir} cannot be read ({type(error).__name__}: "
            f"{error}); it is damaged: `zo replay {run.path} --out DIR` rebuilds the trained "
            "tensors of a zeroth-order run from its trajectory"
        ) from None


def check_base_model(run: RunDirectory, config: RunConfig, model: nn.Module | None = None) -> None:
    """The config's model must be the one the run trained: same name, or else (a moved
    checkpoint directory) the same weights, by the fingerprint in the trajectory header."""
    if not run.trajectory.is_file():
        return  # a checkpoint copied without its run: only its tensors can be checked
    header = run.header()
    trained_on = header.get("model")
    if trained_on == config.model.name:
        return
    if model is not None:
        from zo.models import model_fingerprint

        if model_fingerprint(model) == header.get("model_hash"):
            return
    raise CheckpointError(
        f"{run.path} was trained on model {trained_on!r}, but the config names "
        f"{config.model.name!r}: evaluate it with model.name={trained_on} (or `zo eval "
        f"{run.path}`, which reads the run's own config)"
    )


def check_tensors(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    source: str,
    config: RunConfig,
    check_dtype: bool = True,
) -> None:
    """``tensors`` (a checkpoint's) must be exactly the ``expected`` trainable tensors: the
    same names, shapes and (``check_dtype``) dtypes."""
    kind = config.trainable.kind
    missing = [name for name in expected if name not in tensors]
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the model and trainable set of the config "
            f"(model {config.model.name}, trainable {kind}): {len(missing)} trainable tensors "
            f"are not in it (e.g. {missing[:_SHOWN]}), {len(unexpected)} of its tensors are not "
            f"trainable here (e.g. {unexpected[:_SHOWN]}). Was it trained with another "
            "trainable set or model? Evaluate a run with its own config: zo eval RUN"
        )
    for name, tensor in expected.items():
        saved = tensors[name]
        if saved.shape != tensor.shape or (check_dtype and saved.dtype != tensor.dtype):
            raise CheckpointError(
                f"{source}: tensor {name} is {tuple(saved.shape)} {saved.dtype}, the model of "
                f"the config has {tuple(tensor.shape)} {tensor.dtype} (model {config.model.name}, "
                f"model.dtype {config.model.dtype}): evaluate it with the config it was "
                "trained with"
            )


def load_run_checkpoint(
    run: RunDirectory,
    config: RunConfig,
    trainable: TrainableSet,
    model: nn.Module,
    device: torch.device | str = "cpu",
    at_most: int | None = None,
) -> Checkpoint:
    """Load the run's checkpoint (the newest that verifies, up to step ``at_most``) into
    ``trainable`` (of ``model``, built from ``config``), after checking that it fits: the
    same base model, the same trainable tensors."""
    check_base_model(run, config, model)
    checkpoint = read_checkpoint(run, device, at_most)
    expected = dict(zip(trainable.names, trainable.params, strict=True))
    check_tensors(checkpoint.tensors, expected, f"the checkpoint of {run.path}", config)
    trainable.load_state_dict(checkpoint.tensors)
    return checkpoint
