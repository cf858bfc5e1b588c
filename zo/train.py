"""The training loop: one visible loop for every estimator, plus evaluation and replay."""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import estimators
import tasks
from estimators.base import Closure
from tasks.evaluation import evaluate as evaluate_task
from tasks.objectives import objective_closure, objective_is_differentiable
from zo import models
from zo.blocks import checkpoint_blocks
from zo.config import ConfigError, RunConfig, build, dump_yaml, load_config, to_dict
from zo.distributed import DataParallel
from zo.engine import ENGINE_VERSION, mix_seed, recorded_generator, resolve_generator, seeded
from zo.memory import peak_memory_bytes, reset_peak_memory, return_large_frees_to_os
from zo.trainable import TrainableSet, check_group_settings, param_groups, select_trainable
from zo.trajectory import (
    TRAJECTORY_FORMAT,
    Checkpoint,
    NothingToResumeError,
    ReplayError,
    ReplicaRunDirectory,
    RunDirectory,
    atomic_write_text,
    read_jsonl,
    save_tensors_atomic,
)

_DATA_STREAM = 0xDA7A  # tags the data-order seed stream apart from direction seeds
_TRAINABLE_INIT_STREAM = 0x1417  # and the stream of new trainable tensors (LoRA)

# Changing these on resume would change the trajectory; the rest (steps, logging) may change.
_RESUME_INVARIANT = ("model", "task", "trainable", "estimator", "engine")
_RESUME_INVARIANT_TRAIN = ("batch_size", "grad_accum", "seed", "lr_schedule")


# ---------------------------------------------------------------------- building blocks


def resolve_estimator(config: RunConfig) -> tuple[estimators.EstimatorSpec, Any]:
    """The estimator's spec and its validated config dataclass (ConfigError otherwise)."""
    section = dict(config.estimator)
    name = section.pop("name", None)
    section.pop("param_groups", None)  # torch param groups, built over the trainable set
    try:
        spec = estimators.get_estimator(str(name))
    except estimators.UnknownEstimatorError as error:
        raise ConfigError(f"estimator.name: {error}") from None
    return spec, build(spec.config_class, section, "estimator")


def validate(config: RunConfig) -> tasks.Task:
    """Every check that needs no model: estimator keys and combinations, model, task.

    Returns the task, built and checked (its data is read only when a split is loaded)."""
    spec, _ = resolve_estimator(config)
    if spec.eager_attention and config.model.attn not in (None, "eager"):
        raise ConfigError(
            f"estimator {spec.name} runs torch.func.jvp, which needs eager attention; "
            f"model.attn is {config.model.attn!r}: set model.attn=eager or leave it unset"
        )
    if not spec.grad_accum and config.train.grad_accum > 1:
        raise ConfigError(
            f"estimator {spec.name} updates inside backward and cannot accumulate gradients; "
            f"train.grad_accum is {config.train.grad_accum}: set it to 1 and raise "
            "train.batch_size instead"
        )
    try:
        models.check_model_name(config.model.name)
    except models.ModelNotFoundError as error:
        raise ConfigError(f"model.name {config.model.name!r}: {error}") from None
    if config.task.name not in tasks.available_tasks():
        raise ConfigError(
            f"task.name {config.task.name!r} is unknown; choose one of {tasks.available_tasks()}"
        )
    task = build_task(config)
    if spec.needs_differentiable_loss and not objective_is_differentiable(task):
        raise ConfigError(
            f"estimator {spec.name} needs the gradient of its loss, but task.objective is "
            f"{task.objective!r} (minus a metric of predictions, which has none): use a "
            "zeroth-order estimator or task.objective=loss"
        )
    return task


def build_task(config: RunConfig) -> tasks.Task:
    """The task with its options checked (names, types, files); reads no data yet."""
    try:
        return tasks.get_task(config.task.name, **config.task.options)
    except tasks.TaskError as error:
        raise ConfigError(f"task: {error}") from None


def resolve_device(name: str) -> torch.device:
    """``model.device`` (``auto``: CUDA when there is one); under a data-parallel launcher,
    this rank's own GPU."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )
    return DataParallel.from_environment().device(device)


@dataclass
class Setup:
    """What a run needs besides the loop: built once, shared by train, eval and replay."""

    config: RunConfig
    model: torch.nn.Module
    tokenizer: Any
    task: tasks.Task
    trainable: TrainableSet
    optimizer: torch.optim.Optimizer
    device: torch.device


def load_base_model(
    config: RunConfig, attn: str | None, device: torch.device
) -> tuple[torch.nn.Module, Any]:
    """The model as ``model.*`` says: as stored, or with its linear layers frozen in 4 bits
    (``model.quant``, quantized straight onto ``device``), computing in ``model.dtype``."""
    if config.model.quant == "none":
        return models.load_model(config.model.name, dtype=config.model.dtype, attn=attn)
    from zo.quant import QuantizationError, load_quantized

    with models.checkpoint_directory(config.model.name) as path:
        try:
            model = load_quantized(
                path,
                config.model.quant,
                compute_dtype=models.resolve_dtype(config.model.dtype),
                attn=attn or "eager",
                device=device,
            )
        except QuantizationError as error:
            raise ConfigError(f"model.quant: {error}") from None
        return model, models.load_tokenizer(path)


def build_setup(config: RunConfig) -> Setup:
    task = validate(config)
    spec, estimator_config = resolve_estimator(config)
    device = resolve_device(config.model.device)
    attn = "eager" if spec.eager_attention else config.model.attn
    model, tokenizer = load_base_model(config, attn, device)
    model.to(device).eval()  # eval: no dropout, so a step is a deterministic function of seeds
    # A trainable set may draw new tensors (LoRA's A matrices): from the run's seed, so a
    # replay or a resume rebuilds the same start, whatever the global generator holds.
    with seeded(mix_seed(_TRAINABLE_INIT_STREAM, config.train.seed), device):
        trainable = select_trainable(model, config.trainable)
    if config.train.gradient_checkpointing:
        checkpoint_blocks(model)
    groups = param_groups(trainable, config.estimator.get("param_groups"))
    try:
        optimizer = estimators.build_estimator(
            spec.name,
            groups,
            estimator_config,
            model=model,
            seed=config.train.seed,
            engine=config.engine,
        )
    except ValueError as error:  # a combination the estimator refuses, named by its message
        raise ConfigError(f"estimator {spec.name}: {error}") from None
    check_group_settings(optimizer, groups)
    return Setup(config, model, tokenizer, task, trainable, optimizer, device)


class BatchSampler:
    """Stateless epoch shuffling: the batch of (step, micro-batch) is a pure function."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if size == 0:
            raise ConfigError("the task's training split is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._epochs: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(mix_seed(_DATA_STREAM, self.seed, epoch))
            self._epochs = {epoch: torch.randperm(self.size, generator=generator).tolist()}
        return self._epochs[epoch]

    def indices(self, micro_batch: int) -> list[int]:
        start = micro_batch * self.batch_size
        return [
            self._order(position // self.size)[position % self.size]
            for position in range(start, start + self.batch_size)
        ]


_AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_closure(setup: Setup, examples: list, precision: torch.dtype | None) -> Closure:
    """What the estimator minimises on one micro-batch: the task kind's loss, or minus a
    metric (``task.objective``); the estimator decides about gradients."""
    closure = objective_closure(
        setup.model, setup.tokenizer, setup.task, examples, max_length=setup.config.task.max_length
    )
    if precision is None:
        return closure

    def autocast_closure() -> torch.Tensor:
        with torch.autocast(setup.device.type, dtype=precision):
            return closure().float()

    return autocast_closure


def learning_rate(config: RunConfig, base_lr: float, step: int) -> float:
    if config.train.lr_schedule == "linear":
        return base_lr * (1.0 - step / config.train.steps)
    return base_lr


def evaluate(setup: Setup, examples: list) -> dict[str, Any]:
    """The task's metric (``metric``, ``score``, plus accuracy for candidate tasks)."""
    return evaluate_task(
        setup.model,
        setup.tokenizer,
        setup.task,
        examples,
        batch_size=setup.config.train.eval_batch_size,
        max_length=setup.config.task.max_length,
        calibrate=setup.config.task.calibrate,
    )


def trajectory_header(setup: Setup) -> dict[str, Any]:
    spec, estimator_config = resolve_estimator(setup.config)
    return {
        "format": TRAJECTORY_FORMAT,
        "model": setup.config.model.name,
        "model_hash": models.model_fingerprint(setup.model),
        "trainable": setup.trainable.manifest(),
        "estimator": {"name": spec.name, **to_dict(estimator_config)},
        "run_seed": setup.config.train.seed,
        "engine_version": ENGINE_VERSION,
        "generator": resolve_generator(setup.config.engine, setup.device),
        "device_type": setup.device.type,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        **_scales_entry(setup.optimizer),
    }


def tensor_scales(optimizer: torch.optim.Optimizer) -> list[float] | None:
    """The ZO part's per-tensor scales under ``estimator.scale=relative`` (else None)."""
    from estimators.hybrid import Hybrid

    zeroth = optimizer.zeroth if isinstance(optimizer, Hybrid) else optimizer
    return zeroth.tensor_scales if isinstance(zeroth, estimators.ZOOptimizer) else None


def _scales_entry(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from estimators.scaling import header_entry

    entry = header_entry(tensor_scales(optimizer))
    return {} if entry is None else {"tensor_scales": entry}


def check_recorded_scales(run: RunDirectory, setup: Setup, error: type[Exception]) -> None:
    """The scales a relative-scale run recorded are the ones these weights give (resume,
    replay); a damaged or mismatched record is refused, naming the file."""
    from estimators.scaling import check_header_entry

    entry = run.header().get("tensor_scales")
    scales = tensor_scales(setup.optimizer)
    if entry is None and scales is None:
        return
    if entry is None:
        raise error(f"{run.trajectory}: the header records no tensor_scales for scale=relative")
    try:
        check_header_entry(entry, scales, f"{run.trajectory} header")
    except ValueError as problem:
        raise error(str(problem)) from None


def _with_recorded_generator(config: RunConfig, header: dict, error: type[Exception]) -> RunConfig:
    """``config`` drawing with the generator the run's trajectory was written with (version-1
    runs: ``torch-chunks-v1``), so a resume or replay never draws other directions."""
    try:
        generator = recorded_generator(header)
    except ValueError as problem:
        raise error(f"trajectory header: {problem}") from None
    return dataclasses.replace(
        config, engine=dataclasses.replace(config.engine, generator=generator)
    )


def _check_resumable(run: RunDirectory, config: RunConfig) -> None:
    saved = load_config(run.config)
    for section in _RESUME_INVARIANT:
        if to_dict(getattr(saved, section)) != to_dict(getattr(config, section)):
            raise ConfigError(
                f"resume: {section} differs from the run's config.yaml; a resumed run must "
                "keep model, task, trainable, estimator and engine settings"
            )
    for key in _RESUME_INVARIANT_TRAIN:
        if getattr(saved.train, key) != getattr(config.train, key):
            raise ConfigError(f"resume: train.{key} differs from the run's config.yaml")


# ---------------------------------------------------------------------- the loop


def train(config: RunConfig, log=print) -> dict[str, Any]:
    """Train as ``config`` says; returns the summary that is also saved to summary.json.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1) it trains data parallel: see
    :mod:`zo.distributed`.
    """
    parallel = DataParallel.from_environment()
    parallel.check_batch(config.train.batch_size)
    try:
        return _train(config, log if parallel.is_main else _silent, parallel)
    finally:
        parallel.stop()


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


def _train(config: RunConfig, log, parallel: DataParallel) -> dict[str, Any]:
    return_large_frees_to_os()  # keeps a ZO step's peak RSS at the forward pass's
    run = (RunDirectory if parallel.is_main else ReplicaRunDirectory)(config.train.out)
    if config.resume:
        if not run.holds_run():
            raise NothingToResumeError(f"resume=true but {run.path} holds no run to continue")
        _check_resumable(run, config)
        config = _with_recorded_generator(config, run.header(), ConfigError)
    else:
        run.ensure_new()  # before any model loads: never overwrite a run
    # every rank has checked the directory before the rendezvous, so none sees rank 0's
    parallel.start(resolve_device(config.model.device))
    setup = build_setup(config)
    if config.resume:
        check_recorded_scales(run, setup, ConfigError)
    parallel.attach(setup.optimizer)
    reset_peak_memory(setup.device)  # report training's peak, not loading's (or a conversion's)
    optimizer, train_cfg = setup.optimizer, config.train
    train_examples = setup.task.load("train")[: config.task.train_limit]
    dev_examples = setup.task.load("dev")[: config.task.eval_limit]

    start_step, zero_shot = 0, None
    if config.resume and run.has_checkpoint():
        checkpoint = run.load_checkpoint(setup.device)
        setup.trainable.load_state_dict(checkpoint.tensors)
        optimizer.load_state_dict(checkpoint.optimizer_state)
        start_step, zero_shot = checkpoint.step, checkpoint.extra.get("zero_shot")
        run.rewind(start_step)
        log(f"resuming {run.path} at step {start_step}")
    elif config.resume:
        run.rewind(0)  # killed before its first checkpoint: start over, same seeds
        log(f"{run.path} has no checkpoint yet; starting it over from step 0")
    else:
        run.create(dump_yaml(config), trajectory_header(setup))

    if start_step == 0 and train_cfg.eval_before:
        zero_shot = evaluate(setup, dev_examples)
        log(
            f"zero-shot dev {zero_shot['metric']}: {zero_shot['score']:.4f} "
            f"({len(dev_examples)} examples)"
        )

    precision = _AUTOCAST_DTYPES[train_cfg.autocast]
    sampler = BatchSampler(len(train_examples), train_cfg.batch_size, train_cfg.seed)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    started = time.perf_counter()
    progress = _progress(start_step, train_cfg.steps, train_cfg.progress and parallel.is_main)
    for step in range(start_step, train_cfg.steps):
        for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = learning_rate(config, base_lr, step)
        for micro in range(train_cfg.grad_accum):
            picked = parallel.shard(sampler.indices(step * train_cfg.grad_accum + micro))
            examples = [train_examples[i] for i in picked]
            optimizer.estimate(training_closure(setup, examples, precision))
        loss = optimizer.step()
        record = getattr(optimizer, "last_record", None)
        if record is not None:
            run.append(run.trajectory, {"type": "step", **record.to_dict()})
        done = step + 1
        elapsed = time.perf_counter() - started
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            metrics = {
                "step": step,
                "loss": loss,
                "lr": optimizer.param_groups[0]["lr"],
                "projected_grad": record.scalars if record is not None else None,
                "seconds": elapsed,
                "peak_memory_bytes": peak_memory_bytes(setup.device),
            }
            if train_cfg.eval_every and done % train_cfg.eval_every == 0:
                metrics["dev_score"] = evaluate(setup, dev_examples)["score"]
            run.append(run.metrics, metrics)
        if (train_cfg.save_every and done % train_cfg.save_every == 0) or done == train_cfg.steps:
            run.save_checkpoint(
                Checkpoint(
                    done,
                    setup.trainable.state_dict(),
                    optimizer.state_dict(),
                    {"zero_shot": zero_shot},
                )
            )
    progress.close()
    wall = time.perf_counter() - started
    steps_run = train_cfg.steps - start_step

    final = evaluate(setup, dev_examples)
    summary = {
        "run_dir": str(run.path),
        "steps": train_cfg.steps,
        "metric": final["metric"],
        "zero_shot_score": zero_shot["score"] if zero_shot else None,
        "final_score": final["score"],
        "zero_shot_accuracy": zero_shot.get("accuracy") if zero_shot else None,
        "final_accuracy": final.get("accuracy"),
        "final_loss": _last_loss(run),
        "dev_examples": len(dev_examples),
        "trainable_parameters": setup.trainable.numel(),
        "peak_memory_bytes": peak_memory_bytes(setup.device),
        "device": setup.device.type,
        "processes": parallel.world_size,
        "wall_seconds": wall,
        "steps_per_second": steps_run / wall if wall > 0 else None,
        "loss_plot": str(run.plot),
    }
    if parallel.is_main:
        atomic_write_text(run.summary, json.dumps(summary, indent=2) + "\n")
        plot_loss(run)
    return summary


def _last_loss(run: RunDirectory) -> float | None:
    """The last logged training loss (metrics.jsonl: every estimator logs there, while
    gradient-based ones write no trajectory records)."""
    logged = list(read_jsonl(run.metrics))
    return logged[-1]["loss"] if logged else None


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=start, desc="train", unit="step", disable=not enabled, file=sys.stderr
    )


def plot_loss(run: RunDirectory) -> Path:
    """loss.png: per-step training loss and its running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run.step_records()
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, losses, alpha=0.3, label="loss")
    axis.plot(steps, smooth, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.legend()
    figure.tight_layout()
    tmp = run.plot.with_name(".loss.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(run.plot)
    return run.plot


# ---------------------------------------------------------------------- replay


def replay(run_dir: str | Path, out_dir: str | Path, log=print) -> dict[str, Any]:
    """Rebuild the trained tensors from the base model and trajectory.jsonl alone."""
    run = RunDirectory(run_dir)
    if not run.trajectory.exists() or not run.config.exists():
        raise NothingToResumeError(
            f"{run.path} is not a zo run (no config.yaml / trajectory.jsonl)"
        )
    header = run.header()
    config = _with_recorded_generator(load_config(run.config), header, ReplayError)
    spec, _ = resolve_estimator(config)
    if not spec.zeroth_order:
        raise ReplayError(
            f"{run.path} was trained with {spec.name}, which is not seed-replayable (its "
            "updates use gradients); load the run's checkpoint/ instead (zo eval --checkpoint)"
        )
    setup = build_setup(config)
    fingerprint = models.model_fingerprint(setup.model)
    if fingerprint != header["model_hash"]:
        raise ReplayError(
            f"base model {config.model.name} hashes to {fingerprint}, the run started from "
            f"{header['model_hash']}: replay needs the same base weights"
        )
    if setup.trainable.manifest() != header["trainable"]:
        raise ReplayError("the trainable set differs from the run's manifest")
    check_recorded_scales(run, setup, ReplayError)
    records = run.step_records()
    for data in records:
        setup.optimizer.apply_record(
            estimators.StepRecord.from_dict({k: v for k, v in data.items() if k != "type"})
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(setup.trainable.state_dict(), out / "trainable.safetensors")
    result: dict[str, Any] = {"steps": len(records), "out": str(out / "trainable.safetensors")}
    if run.has_checkpoint():
        saved = run.load_checkpoint(setup.device)
        if saved.step == len(records):
            replayed = setup.trainable.state_dict()
            result["bit_identical_to_checkpoint"] = all(
                torch.equal(replayed[name], saved.tensors[name]) for name in replayed
            )
    log(json.dumps(result))
    return result
