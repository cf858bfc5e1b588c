"""A run directory's own config: read back (damage named), and checked against a resume's."""

from __future__ import annotations

from zo.config import ConfigError, RunConfig, config_from_data, read_run_yaml, to_dict
from zo.engine_config import LEGACY_GENERATOR as LEGACY
from zo.run_directory import RunDirectory
from zo.trajectory import RunDamagedError

_RESUME_INVARIANT = ("model", "task", "trainable", "estimator")
_RESUME_INVARIANT_TRAIN = ("batch_size", "grad_accum", "seed", "lr_schedule")
_DIRECTION_FIELDS = ("generator", "distribution")
"""The engine fields that decide the directions; the others change only speed and memory
(and ``chunk_size`` changes ``torch-chunks-v1``'s directions too)."""


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


def check_resumable(run: RunDirectory, config: RunConfig, log=print) -> None:
    """``config`` may resume ``run``: the settings that decide its steps are unchanged.

    Engine settings that change only speed and memory (threads, buckets, prefetch, the
    output-side limits) may differ, e.g. on another machine or after a release changed a
    default: said, with the run's value, and the resume goes on."""
    saved = load_run_config(run)
    for section in _RESUME_INVARIANT:
        if to_dict(getattr(saved, section)) != to_dict(getattr(config, section)):
            raise ConfigError(
                f"resume: {section} differs from the run's config.yaml; a resumed run must "
                "keep model, task, trainable, estimator and the engine's directions"
            )
    deciding = _DIRECTION_FIELDS + (("chunk_size",) if saved.engine.generator == LEGACY else ())
    for key, was in to_dict(saved.engine).items():
        now = getattr(config.engine, key)
        if was == now:
            continue
        if key in deciding:
            raise ConfigError(
                f"resume: engine.{key} is {now!r}, the run's config.yaml has {was!r}; it decides "
                f"the run's directions: keep engine.{key}={was}"
            )
        log(
            f"resume: engine.{key} is {now!r} here, {was!r} in the run's config.yaml (speed "
            "and memory only: the directions are the same)"
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
