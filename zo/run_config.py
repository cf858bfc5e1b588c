"""A run directory's own config: read back (damage named), and checked against a resume's."""

from __future__ import annotations

from zo.config import ConfigError, RunConfig, config_from_data, read_run_yaml, to_dict
from zo.run_directory import RunDirectory
from zo.trajectory import RunDamagedError

_RESUME_INVARIANT = ("model", "task", "trainable", "estimator", "engine")
_RESUME_INVARIANT_TRAIN = ("batch_size", "grad_accum", "seed", "lr_schedule")


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


def check_resumable(run: RunDirectory, config: RunConfig) -> None:
    """``config`` may resume ``run``: the settings that decide its steps are unchanged."""
    saved = load_run_config(run)
    for section in _RESUME_INVARIANT:
        if to_dict(getattr(saved, section)) != to_dict(getattr(config, section)):
            raise ConfigError(
                f"resume: {section} differs from the run's config.yaml; a resumed run must "
                "keep model, task, trainable, estimator and engine settings"
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
