"""Run configuration: dataclasses are the schema, YAML fills them, ``a.b=value`` overrides.

Validation happens here, before any model loads: an unknown key, a wrong type or a
missing file is a :class:`ConfigError` naming the key and the valid choices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from zo.engine import EngineConfig


class ConfigError(ValueError):
    """A usage error in a config or an override; the CLI exits with code 2."""


@dataclass
class ModelConfig:
    name: str = "tiny-llama"
    """A registered model (``zo list models``) or a local HF checkpoint directory."""
    dtype: str = "float32"
    """``float32``, ``bfloat16``, ``float16`` (or ``fp32``, ``bf16``, ``fp16``: stored by their
    full name)."""
    attn: str | None = None
    """Attention implementation (``eager``, ``sdpa``); None = the family's default."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:1``; ``auto`` = CUDA when available."""
    quant: str = "none"
    """``nf4``: the base weights load frozen in 4 bits (bitsandbytes NF4, compute in
    ``dtype``); train a mask or LoRA over them."""


@dataclass
class TaskConfig:
    name: str = "sentiment"
    max_length: int = 128
    train_limit: int | None = None
    """Use only the first N training examples (after the seeded shuffle)."""
    eval_limit: int | None = None
    """Evaluate on only the first N dev examples."""
    calibrate: bool = False
    """Eval only: calibrate candidate scores against a content-free input (SFC/PMI)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The task's own options (``path``, ``template``, ``verbalizer``, ``objective``...).
    In YAML they sit directly under ``task:``; the task validates them by name."""


DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")


@dataclass
class TrainableConfig:
    kind: Literal["full", "names", "mask", "lora"] = "full"
    patterns: list[str] = field(default_factory=list)
    """For ``names``: fnmatch patterns over parameter names (``*.norm.weight``)."""
    path: str | None = None
    """For ``mask``: the mask file (``zo mask``); only the masked entries train, as fp32
    values added to a frozen base (``trainable: mask:PATH``)."""
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """For ``lora``: rank, scale and target module names of the peft adapters."""


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    """Micro-batches per step (ZO: averaged scalars of one seed)."""
    seed: int = 0
    """Run seed: directions and data order derive from it."""
    out: str = "runs/default"
    """Run directory."""
    eval_every: int = 0
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    log_every: int = 10
    eval_batch_size: int = 32
    lr_schedule: Literal["constant", "linear"] = "constant"
    gradient_checkpointing: bool = False
    """First-order estimators: recompute activations in backward (HF models)."""
    autocast: Literal["none", "bf16", "fp16"] = "none"
    """Mixed precision for the forward passes (``torch.autocast``); weights keep model.dtype."""
    check_memory: bool = True
    """Refuse a batch that ``zo plan`` predicts cannot fit in the device's memory (available
    RAM on CPU, the GPU's memory on CUDA), before the model loads; false: try anyway."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss: ``stop`` (exit code 3, nothing non-finite saved), or ``skip`` the
    step without an update (recorded in the trajectory; zeroth-order estimators, one
    process). Non-finite weights always stop."""
    eval_before: bool = True
    """Evaluate the untrained model first (the zero-shot baseline)."""
    progress: bool = True
    report_to: list[str] = field(default_factory=list)
    """Reporters besides the run's own files: ``tensorboard``, ``wandb``, ``csv``
    (:mod:`zo.reporting`); none by default."""
    keep_checkpoints: int = 1
    """Checkpoints kept: ``checkpoint/`` (the newest) plus k - 1 older ``checkpoint-STEP/``;
    resume takes the newest that verifies."""
    repair: bool = False
    """With ``resume=true``: continue a run whose trajectory, metrics or checkpoints are
    damaged from its intact part (damaged files are kept as copies, never deleted). Without
    it, resume refuses a damaged run and changes nothing."""
    parallel: Literal["data", "fsdp", "offload"] = "data"
    """Under a launcher: ``data`` (every rank holds the model, scalars are all-reduced) or
    ``fsdp`` (FSDP2 shards the decoder blocks; each rank perturbs and updates its own rows).
    In one process: ``offload`` keeps the decoder blocks in host memory and copies each
    block's weights to the device for its call only."""
    offload_prefetch: int = 1
    """With ``parallel=offload``: blocks copied ahead while one computes (k); at most k + 1
    blocks are on the device at once."""
    offload_streams: Literal["auto", "on", "off"] = "auto"
    """With ``parallel=offload``: ``auto`` copies from pinned host memory on a side CUDA
    stream (on a CPU device the host is the device); ``on`` asks for that (said once where
    there is no CUDA); ``off`` copies on the compute stream, each waited for (no overlap)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    estimator: dict[str, Any] = field(default_factory=lambda: {"name": "zo_sgd"})
    """``name`` picks the estimator; the other keys are its config dataclass's fields."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False
    """Continue the run in ``train.out`` from its last checkpoint."""


# ---------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert only the lossless cases."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # no setting of ours means anything at nan or inf
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def build(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; valid keys{' under ' + where if where else ''}: "
            f"{sorted(known)}"
        )
    kwargs = {
        name: _coerce(value, hints[name], f"{where}.{name}" if where else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where or 'config'}: {error}") from None


def to_dict(config: Any) -> Any:
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


# ---------------------------------------------------------------------- files and overrides


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory (pass --config PATH to a YAML file)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (pass --config PATH to a YAML file)")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not text: byte {error.start} is not UTF-8; is it a YAML file?"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping."""
    data = _deep_copy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {override!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(_mapping_key(node, part), {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
            node = child
        node[_mapping_key(node, parts[-1])] = value
    return data


def _mapping_key(node: dict[Any, Any], part: str) -> Any:
    """The key ``part`` names in ``node``: a mapping keyed by YAML numbers (a verbalizer's
    labels ``0: ...``) gets ``task.verbalizer.1=...`` as the number 1, so the override
    changes or adds that entry instead of adding a string key beside it."""
    if part in node:
        return part
    try:
        typed = yaml.safe_load(part)
    except yaml.YAMLError:
        return part
    if isinstance(typed, bool) or not isinstance(typed, (int, float)):
        return part
    if typed in node or any(isinstance(k, (int, float)) and not isinstance(k, bool) for k in node):
        return typed
    return part


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _normalise_shorthands(data: dict[str, Any]) -> dict[str, Any]:
    """Accept ``trainable: full`` / ``trainable: "names:a,b"`` and ``estimator: zo_sgd``."""
    data = dict(data)
    trainable = data.get("trainable")
    if isinstance(trainable, str):
        kind, _, rest = trainable.partition(":")
        items = [p for p in rest.split(",") if p]
        # each kind's argument goes to its own field: a mask's file, LoRA's target modules
        if kind == "mask":
            data["trainable"] = {"kind": kind, "path": rest or None}
        elif kind == "lora":
            data["trainable"] = {"kind": kind, **({"lora_targets": items} if items else {})}
        else:
            data["trainable"] = {"kind": kind, "patterns": items}
    estimator = data.get("estimator")
    if isinstance(estimator, str):
        data["estimator"] = {"name": estimator}
    task = data.get("task")
    if isinstance(task, dict):
        # `task: {name: jsonl, path: ..., template: ...}`: the task's own keys go to options.
        loop_keys = {f.name for f in dataclasses.fields(TaskConfig)}
        options = dict(task.get("options") or {})
        options.update({k: v for k, v in task.items() if k not in loop_keys})
        data["task"] = {k: v for k, v in task.items() if k in loop_keys} | {"options": options}
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    return config_from_data(read_yaml(path) if path is not None else {}, overrides)


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """:func:`load_config` for the commands: the file (or an override) must name the model
    and the task. The defaults are the tests' fixtures (a random tiny-llama on the bundled
    sentiment rows): training them because a file is empty or lacks a section is a mistake,
    never an experiment, so it is refused rather than run."""
    return experiment_from_data(read_yaml(path), overrides, path)


def experiment_from_data(
    data: dict[str, Any], overrides: list[str] | None, source: str | Path
) -> RunConfig:
    """:func:`config_from_data`, refused unless the data of file ``source`` (or an
    override) names the model and the task (see :func:`load_experiment`). An error of the
    file's own is said to be the file's."""
    try:
        config = config_from_data(data, overrides)
    except ConfigError as error:
        raise _named(error, data, source) from None
    named = apply_overrides(_normalise_shorthands(data), overrides or [])
    missing = [
        f"{section}.name"
        for section in ("model", "task")
        if not isinstance(named.get(section), dict) or "name" not in named[section]
    ]
    if missing:
        what = "is empty" if not data else f"names no {' and no '.join(missing)}"
        raise ConfigError(
            f"config file {source} {what}: an experiment names its model and task (see "
            "experiments/tiny/smoke.yaml), in the file or as overrides such as "
            "model.name=tiny-llama task.name=sentiment"
        )
    return config


def _named(error: ConfigError, data: dict[str, Any], source: str | Path) -> ConfigError:
    """``error`` naming the file ``source`` when the file alone gives it (not an override)."""
    if str(source) in str(error):
        return error
    try:
        config_from_data(data)
    except ConfigError as own:
        if str(own) == str(error):
            return ConfigError(f"config file {source}: {error}")
    return error


RUN_SECTIONS = ("model", "task", "trainable", "estimator", "train")
"""The sections of every config.yaml that ``zo train`` writes into a run directory."""


def read_run_yaml(path: str | Path) -> dict[str, Any]:
    """A run's config.yaml: zo writes every section, so one missing is damage (read with
    the defaults, it would describe another run)."""
    data = read_yaml(path)
    missing = [section for section in RUN_SECTIONS if not isinstance(data.get(section), dict)]
    if missing:
        raise ConfigError(
            f"{path} has no {' and no '.join(missing)} section: a run's config.yaml holds "
            f"all of {list(RUN_SECTIONS)} (zo train writes them), so this one is damaged; "
            "restore it"
        )
    return data


def config_from_data(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from parsed YAML plus ``key.sub=value`` overrides, checked."""
    data = apply_overrides(_normalise_shorthands(data), overrides or [])
    config = build(RunConfig, _normalise_shorthands(data))
    if "name" not in config.estimator:
        raise ConfigError("estimator.name is missing (e.g. estimator.name=zo_sgd)")
    _check_ranges(config)
    config.model.dtype = DTYPES[config.model.dtype]  # an alias is stored by its full name
    return config


def _check_ranges(config: RunConfig) -> None:
    train = config.train
    for key in (
        "steps",
        "batch_size",
        "grad_accum",
        "eval_batch_size",
        "log_every",
        "keep_checkpoints",
        "offload_prefetch",
    ):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(train, key)}")
    for key in ("train_limit", "eval_limit"):
        limit = getattr(config.task, key)
        if limit is not None and limit < 1:
            raise ConfigError(f"task.{key} must be >= 1 (or unset: all examples), got {limit}")
    for key in ("eval_every", "save_every"):
        if getattr(train, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0 (0 = off), got {getattr(train, key)}")
    if config.trainable.kind == "names" and not config.trainable.patterns:
        raise ConfigError("trainable.patterns is empty; `names` needs at least one pattern")
    if config.trainable.kind == "mask" and not config.trainable.path:
        raise ConfigError(
            "trainable.path is empty; `mask` needs a mask file (trainable: mask:PATH)"
        )
    if config.trainable.kind == "lora" and config.trainable.lora_r < 1:
        raise ConfigError(f"trainable.lora_r must be >= 1, got {config.trainable.lora_r}")
    if config.model.quant not in QUANTIZATIONS:
        raise ConfigError(f"model.quant {config.model.quant!r} is not one of {list(QUANTIZATIONS)}")
    if config.model.quant != "none" and config.trainable.kind == "full":
        raise ConfigError(
            f"model.quant={config.model.quant} freezes the base weights in 4 bits; train a "
            "mask (trainable: mask:PATH), LoRA adapters (trainable: lora) or named "
            "unquantized tensors (trainable: names:*norm*) over it"
        )
    if not config.train.out.strip():
        raise ConfigError("train.out is empty: name the run directory (train.out=runs/NAME)")
    if config.task.max_length < 8:
        raise ConfigError(f"task.max_length must be >= 8, got {config.task.max_length}")
    if config.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype {config.model.dtype!r} is not one of {sorted(DTYPES)}")


DTYPES = {
    **{name: name for name in ("float32", "bfloat16", "float16")},
    **{"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"},
}
"""``model.dtype``'s accepted names -> the full name a run's config.yaml stores."""
QUANTIZATIONS = ("none", "nf4")


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
