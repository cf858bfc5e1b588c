"""A run directory's own config: read back (damage named), and checked against a resume's."""

from __future__ import annotations

from dataclasses import replace

from zo.config import ConfigError, RunConfig, config_from_data, read_run_yaml, to_dict
from zo.run_directory import RunDirectory
from zo.trajectory import RunDamagedError

_RESUME_INVARIANT = ("model", "task", "trainable", "estimator")
_RESUME_INVARIANT_TRAIN = ("batch_size", "grad_accum", "seed", "lr_schedule")
_DIRECTION_FIELDS = ("generator", "distribution", "chunk_size")
"""Engine fields that may decide the directions: a resume must keep them. ``chunk_size``
decides version 1's (``torch-chunks-v1``), whose config.yaml may name no generator."""
_ROUNDING_FIELDS = ("offload_threshold", "offload_max_rows")
"""Engine fields that choose how a large layer is perturbed (a copy or through its output):
the same directions, but on an accelerator the forward may round otherwise, so a resume
keeps the run's values (a default that changed since applies to new runs)."""


def load_run_config(run: RunDirectory) -> RunConfig:
    """A run's own config.yaml; a damaged one is an error naming it."""
    try:
        return config_from_data(read_run_yaml(run.config))
    except UnicodeDecodeError:
        raise RunDamagedError(f"{run.config} is not a text file (damaged?)") from None
    except ConfigError as error:
        message = str(error)
        raise ConfigError(
            message if str(run.config) in message else f"{run.config}: {message}"
        ) from None


def check_resumable(run: RunDirectory, config: RunConfig, log=print) -> RunConfig:
    """``config`` may resume ``run``: the settings that decide its steps are unchanged.

    Returns ``config`` with the run's own values of :data:`_ROUNDING_FIELDS`. The engine's
    speed settings (threads, buckets, prefetch) may differ, e.g. on another machine: no
    value depends on them. Every engine difference is said."""
    saved = load_run_config(run)
    for section in _RESUME_INVARIANT:
        if to_dict(getattr(saved, section)) != to_dict(getattr(config, section)):
            raise ConfigError(
                f"resume: {section} differs from the run's config.yaml; a resumed run must "
                "keep model, task, trainable, estimator and the engine's directions"
            )
    kept = {}
    for key, was in to_dict(saved.engine).items():
        now = getattr(config.engine, key)
        if was == now:
            continue
        if key in _DIRECTION_FIELDS:
            raise ConfigError(
                f"resume: engine.{key} is {now!r}, the run's config.yaml has {was!r}; it decides "
                f"the run's directions: keep engine.{key}={was}"
            )
        if key in _ROUNDING_FIELDS:
            kept[key] = was
            log(
                f"resume: keeping the run's engine.{key}={was} (not {now}): it can change how "
                "a forward rounds on an accelerator, and a resume ends where the run would"
            )
        else:
            log(
                f"resume: engine.{key} is {now!r} here, {was!r} in the run's config.yaml (speed "
                "only: every value is the same)"
            )
    for key in _RESUME_INVARIANT_TRAIN:
        if getattr(saved.train, key) != getattr(config.train, key):
            raise ConfigError(f"resume: train.{key} differs from the run's config.yaml")
    if config.train.lr_schedule != "constant" and saved.train.steps != config.train.steps:
        raise ConfigError(
            f"resume: train.steps is {config.train.steps}, the run's config.yaml has "
            f"{saved.train.steps}; the {config.train.lr_schedule} lr schedule decays over "
            f"train.steps, so changing it would change the lr of every step left: keep "
            f"train.steps={saved.train.steps}"
        )
    return replace(config, engine=replace(config.engine, **kept)) if kept else config
