"""The training loop: one visible loop for every estimator, plus evaluation and replay."""

from __future__ import annotations

import dataclasses
import json
import math
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
from estimators.scale_records import check_recorded_scales, scales_header
from tasks.evaluation import evaluate as evaluate_task
from tasks.objectives import objective_closure, objective_is_differentiable
from zo import checkpoint as checkpoints
from zo import models
from zo.blocks import checkpoint_blocks
from zo.config import (
    ConfigError,
    RunConfig,
    build,
    dump_yaml,
    to_dict,
)
from zo.distributed import DataParallel
from zo.divergence import DivergenceGuard
from zo.engine import (
    engine_version,
    mix_seed,
    recorded_generator,
    resolve_generator,
    seeded,
)
from zo.loss_plot import plot_loss
from zo.memory import peak_memory_bytes, reset_peak_memory, return_large_frees_to_os
from zo.metrics_log import MetricsLog, last_loss
from zo.offload import check_offloaded_run, offload_blocks
from zo.preflight import (
    check_batch_fits_data,
    check_batch_fits_memory,
    check_device_available,
    check_run_directory,
    parse_device,
)
from zo.reporting import Reporters, check_reporters
from zo.run_config import check_resumable
from zo.run_directory import ReplicaRunDirectory, ResumePlan, RunDirectory
from zo.run_lock import run_lock
from zo.schedule import LRSchedule
from zo.sharded import (
    check_sharded_run,
    full_tensors,
    load_full_tensors,
    shard_for_training,
    sharded_estimator,
)
from zo.sharded_loading import load_for_sharding
from zo.trainable import TrainableSet, check_group_settings, param_groups, select_trainable
from zo.trajectory import (
    TRAJECTORY_FORMAT,
    Checkpoint,
    NothingToResumeError,
    RunDamagedError,
    atomic_write_text,
)

_DATA_STREAM = 0xDA7A  # tags the data-order seed stream apart from direction seeds
_TRAINABLE_INIT_STREAM = 0x1417  # and the stream of new trainable tensors (LoRA)

# Changing these on resume would change the trajectory; the rest (steps, logging) may change.


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
    estimator_config = build(spec.config_class, section, "estimator")
    _check_settings(to_dict(estimator_config), "estimator.")
    for position, group in enumerate(config.estimator.get("param_groups") or []):
        if isinstance(group, dict):  # the shape is checked where the groups are built
            _check_settings(group, f"estimator.param_groups[{position}].")
    return spec, estimator_config


def _check_settings(settings: dict[str, Any], prefix: str) -> None:
    """The estimator's own range checks (finite, positive, ...), at config time."""
    numbers = {}
    for key, value in settings.items():
        try:
            numbers[key] = float(value) if isinstance(value, str) else value
        except ValueError:
            numbers[key] = value  # not a number: the check below names it
    try:
        estimators.check_hyperparameters(**numbers)
    except ValueError as error:
        raise ConfigError(f"{prefix}{error}") from None


def validate(config: RunConfig) -> tasks.Task:
    """Every check that needs no model: estimator keys and combinations, model, task.

    Returns the task, built and checked (its data is read only when a split is loaded)."""
    spec, _ = resolve_estimator(config)
    parse_device(config.model.device)
    if spec.traits.eager_attention and config.model.attn not in (None, "eager"):
        raise ConfigError(
            f"estimator {spec.name} runs torch.func.jvp, which needs eager attention; "
            f"model.attn is {config.model.attn!r}: set model.attn=eager or leave it unset"
        )
    if not spec.traits.grad_accum and config.train.grad_accum > 1:
        raise ConfigError(
            f"estimator {spec.name} updates inside backward and cannot accumulate gradients; "
            f"train.grad_accum is {config.train.grad_accum}: set it to 1 and raise "
            "train.batch_size instead"
        )
    if config.train.on_nonfinite == "skip" and not spec.traits.replayable:
        raise ConfigError(
            f"train.on_nonfinite=skip records a skipped step in the trajectory, which only "
            f"zeroth-order estimators write; {spec.name} is not one: use stop"
        )
    try:
        models.check_model_name(config.model.name)
    except models.ModelNotFoundError as error:
        raise ConfigError(f"model.name {config.model.name!r}: {error}") from None
    if config.task.name not in tasks.available_tasks():
        raise ConfigError(
            f"task.name {config.task.name!r} is unknown; choose one of {tasks.available_tasks()}"
        )
    check_reporters(config.train.report_to)
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
    parse_device(name)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )
    device = DataParallel.from_environment().device(device)
    check_device_available(device)
    return device


@dataclass
class Setup:
    """What a run needs besides the loop: built once, shared by train, eval and replay."""

    config: RunConfig
    model: torch.nn.Module
    tokenizer: Any
    task: tasks.Task
    trainable: TrainableSet
    optimizer: estimators.Estimator
    device: torch.device
    model_hash: str | None = None
    """The base model's fingerprint, taken before sharding (None: not sharded)."""

    @property
    def sharded(self) -> bool:
        return self.model_hash is not None

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors whole (sharded: gathered, a collective on every rank)."""
        tensors = self.trainable.state_dict()
        if not self.sharded:
            return tensors
        return full_tensors(tensors, keep=torch.distributed.get_rank() == 0)  # rank 0 writes

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.sharded:
            load_full_tensors(self.trainable.names, self.trainable.params, tensors)
        else:
            self.trainable.load_state_dict(tensors)


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


def build_setup(config: RunConfig, shard: bool = False, offload: bool = False) -> Setup:
    """Everything a run needs; ``shard``: FSDP2 over the process group, ``offload``: blocks
    at home, streamed per layer (``train.parallel``; replay needs neither)."""
    task = validate(config)
    spec, estimator_config = resolve_estimator(config)
    device = resolve_device(config.model.device)
    attn = "eager" if spec.traits.eager_attention else config.model.attn
    meta = load_for_sharding(config, attn) if shard else None  # each rank reads its rows
    model, tokenizer, checkpoint = meta or (*load_base_model(config, attn, device), None)
    model_hash, units = None, []
    # A trainable set may draw new tensors (LoRA's A matrices): from the run's seed, so a
    # replay or a resume rebuilds the same start, whatever the global generator holds.
    with seeded(mix_seed(_TRAINABLE_INIT_STREAM, config.train.seed), device):
        if not (shard or offload):  # sharded: chosen, hashed, sharded, then moved; offload:
            model.to(device)  # stays home, offload_blocks places it
        if meta:  # real adapters and mask buffers beside a meta base, as a whole load has
            trainable = checkpoint.select(model, config.trainable)
        else:
            trainable = select_trainable(model, config.trainable)
    if shard:  # each block reaches the device as this rank's shard only
        # of the whole base, as replay sees it
        model_hash = checkpoint.fingerprint(model) if meta else models.model_fingerprint(model)
        trainable, units = shard_for_training(model, device, trainable, checkpoint)
    (model if offload else model.to(device)).eval()  # eval: a step is a function of seeds
    if config.train.gradient_checkpointing:
        checkpoint_blocks(model)
    if offload:  # after the trainable set: its adapters stream with their blocks
        offload_blocks(model, device, config.train.offload_prefetch, config.train.offload_streams)
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
    if shard:
        sharded_estimator(optimizer, units, spec.traits.zeroth_order)
    return Setup(config, model, tokenizer, task, trainable, optimizer, device, model_hash)


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
    generator = resolve_generator(setup.config.engine, setup.device)
    return {
        "format": TRAJECTORY_FORMAT,
        "model": setup.config.model.name,
        "model_hash": setup.model_hash or models.model_fingerprint(setup.model),
        "trainable": setup.trainable.manifest(),
        "estimator": {"name": spec.name, **to_dict(estimator_config)},
        "run_seed": setup.config.train.seed,
        "engine_version": engine_version(generator),
        "generator": generator,
        "device_type": setup.device.type,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        **scales_header(setup.optimizer),
    }


def with_recorded_generator(
    config: RunConfig, header: dict[str, Any], error: type[Exception], where: Path
) -> RunConfig:
    """``config`` drawing with the generator the run's trajectory was written with (version-1
    runs: ``torch-chunks-v1``), so a resume or replay never draws other directions; a header
    from an engine or generator this zo does not know raises ``error``."""
    try:
        generator = recorded_generator(header)
    except ValueError as problem:
        raise error(f"{where} line 1: {problem}") from None
    return dataclasses.replace(
        config, engine=dataclasses.replace(config.engine, generator=generator)
    )


def _open_run(
    run: RunDirectory, setup: Setup, plan: ResumePlan | None, log
) -> tuple[int, dict[str, Any] | None]:
    """Create the run directory, or resume it as ``plan`` says: the checkpoint loaded into
    ``setup`` first, the directory changed only once everything fits. Returns the step to
    start from and the zero-shot result saved with the checkpoint."""
    header = trajectory_header(setup)
    if plan is None:
        run.create(dump_yaml(setup.config), header)
        return 0, None
    run.check_header(plan, header, log)
    start_step, zero_shot = 0, None
    if plan.state is not None:
        folder = plan.state.folder
        _, checkpoint = checkpoints.load(folder, setup.device, log=log, verified=True)
        try:
            setup.load_checkpoint_tensors(checkpoint.tensors)
            setup.optimizer.load_state_dict(checkpoint.optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            raise RunDamagedError(f"{folder} does not fit this run: {error}") from None
        start_step, zero_shot = checkpoint.step, checkpoint.extra.get("zero_shot")
    run.commit_resume(plan, header, dump_yaml(setup.config), log)
    if start_step:
        log(f"resuming {run.path} at step {start_step}")
    elif plan.trajectory is not None:  # killed before its first checkpoint: same seeds again
        log(f"{run.path} has no usable checkpoint; starting it over from step 0")
    return start_step, zero_shot


# ---------------------------------------------------------------------- the loop


def train(config: RunConfig, log=print) -> dict[str, Any]:
    """Train as ``config`` says; returns the summary that is also saved to summary.json.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1) it trains data parallel: see
    :mod:`zo.distributed`.
    """
    parallel = DataParallel.from_environment()
    parallel.check_batch(config.train.batch_size)
    check_sharded_run(config, parallel.world_size, estimators.estimators_with("shardable"))
    check_offloaded_run(config, parallel.world_size, estimators.estimators_with("offloadable"))
    if parallel.world_size > 1 and config.train.on_nonfinite == "skip":
        raise ConfigError(
            "train.on_nonfinite=skip is for one process: under a launcher a rank whose shard "
            "gives a non-finite loss cannot skip alone; use stop"
        )
    log = log if parallel.is_main else _silent
    train_examples = preflight(config, parallel, log)
    try:
        with run_lock(config.train.out, enabled=parallel.is_main):  # rank 0 alone writes
            return _train(config, log, parallel, train_examples)
    finally:
        parallel.stop()


def preflight(config: RunConfig, parallel: DataParallel, log) -> list[tasks.Example]:
    """Every check of a training run that needs no model, before anything loads or is
    written: the run directory, the config, the device, the batch against the data and
    against memory. Returns the training examples (read here to count them)."""
    check_run_directory(config.train.out, config.resume)
    task = validate(config)
    device = resolve_device(config.model.device)
    examples = task.load("train")[: config.task.train_limit]
    check_batch_fits_data(config, len(examples))
    per_rank = config.train.batch_size // parallel.world_size
    estimator = estimators.get_estimator(str(config.estimator.get("name"))).planned()
    sequences = per_rank * _sequences_per_example(task, examples)
    check_batch_fits_memory(config, device, sequences, log, estimator, parallel.world_size)
    return examples


def _sequences_per_example(task: tasks.Task, examples: list[tasks.Example]) -> int:
    """Sequences a forward reads per example: one per candidate, one for generation."""
    if task.kind == "generation" or not examples:
        return 1
    return max(len(task.candidates(example)) for example in examples[:16])


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


def _train(
    config: RunConfig, log, parallel: DataParallel, train_examples: list[tasks.Example]
) -> dict[str, Any]:
    return_large_frees_to_os()  # keeps a ZO step's peak RSS at the forward pass's
    run = (RunDirectory if parallel.is_main else ReplicaRunDirectory)(
        config.train.out, keep_checkpoints=config.train.keep_checkpoints
    )
    plan, (spec, _) = None, resolve_estimator(config)
    if config.resume:
        if not run.holds_run():
            raise NothingToResumeError(f"resume=true but {run.path} holds no run to continue")
        config = check_resumable(run, config, log)
        plan = run.plan_resume(spec.traits.replayable, config.train.repair, log)  # reads only
        if plan.start_step > config.train.steps:
            raise ConfigError(
                f"resume: train.steps is {config.train.steps}, but {plan.state.folder} is at "
                f"step {plan.start_step} already: a resume continues a run, it cannot shorten "
                f"it; pass train.steps={plan.start_step} or more (nothing was changed)"
            )
        if plan.trajectory is not None and plan.trajectory.header is not None:
            config = with_recorded_generator(
                config, plan.trajectory.header, ConfigError, run.trajectory
            )
    else:
        run.ensure_new()  # before any model loads: never overwrite a run
    # every rank has checked the directory before the rendezvous, so none sees rank 0's
    parallel.start(resolve_device(config.model.device))
    parallel_mode = config.train.parallel
    setup = build_setup(config, shard=parallel_mode == "fsdp", offload=parallel_mode == "offload")
    if plan is not None and plan.trajectory is not None and plan.trajectory.header is not None:
        check_recorded_scales(plan.trajectory.header, run.trajectory, setup.optimizer, ConfigError)
    parallel.attach(setup.optimizer)
    reset_peak_memory(setup.device)  # report training's peak, not loading's (or a conversion's)
    optimizer, train_cfg = setup.optimizer, config.train
    dev_examples = setup.task.load("dev")[: config.task.eval_limit]

    schedule = LRSchedule.before_resume(config, optimizer)  # base lrs of a fresh optimizer
    start_step, zero_shot = _open_run(run, setup, plan, log)

    reporters = Reporters.open(
        train_cfg.report_to, run.path, to_dict(config), start_step, enabled=parallel.is_main
    )
    metrics_log = MetricsLog(run, reporters)  # numbered as the progress bar counts
    if start_step == 0 and train_cfg.eval_before:
        zero_shot = evaluate(setup, dev_examples)
        log(
            f"zero-shot dev {zero_shot['metric']}: {zero_shot['score']:.4f} "
            f"({len(dev_examples)} examples)"
        )
        metrics_log.zero_shot(zero_shot["score"])  # the bar's 0: before any update

    precision = _AUTOCAST_DTYPES[train_cfg.autocast]
    sampler = BatchSampler(len(train_examples), train_cfg.batch_size, train_cfg.seed)
    guard = DivergenceGuard.for_run(config, log)
    guard.saved(start_step)
    started = time.perf_counter()
    progress = _progress(start_step, train_cfg.steps, train_cfg.progress and parallel.is_main)
    for step in range(start_step, train_cfg.steps):
        schedule.apply(optimizer, step)
        try:
            closures = []
            for micro in range(train_cfg.grad_accum):
                picked = parallel.shard(sampler.indices(step * train_cfg.grad_accum + micro))
                examples = [train_examples[i] for i in picked]
                closures.append(training_closure(setup, examples, precision))
            if len(closures) == 1:  # ZO-SGD's sync-free step: its scalars read after the update
                loss = optimizer.step(closures[0])
            else:
                for closure in closures:
                    optimizer.estimate(closure)
                loss = optimizer.step()
        except FloatingPointError as error:  # a non-finite loss or gradient, before any update
            reason = guard.step_failed(
                step,
                error,
                setup.trainable.state_dict(),
                loss=isinstance(error, estimators.NonFiniteLossError),
                can_skip=spec.traits.replayable,
            )
            optimizer.skip_step(reason)
            loss = math.nan
            log(f"step {step} skipped: {reason}")
        record = optimizer.last_record
        if record is None or "skipped" not in record.extra:
            guard.after_step(step, loss, record.scalars if record is not None else None)
        if record is not None:
            run.append(run.trajectory, {"type": "step", **record.to_dict()})
        done = step + 1
        elapsed = time.perf_counter() - started
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            metrics = {
                "loss": loss,
                "lr": optimizer.param_groups[0]["lr"],
                "projected_grad": record.scalars if record is not None else None,
                "seconds": elapsed,
                "peak_memory_bytes": peak_memory_bytes(setup.device),
            }
            if train_cfg.eval_every and done % train_cfg.eval_every == 0:
                metrics["dev_score"] = evaluate(setup, dev_examples)["score"]
            metrics_log.step(done, metrics)
        if (train_cfg.save_every and done % train_cfg.save_every == 0) or done == train_cfg.steps:
            tensors = setup.checkpoint_tensors()  # sharded: gathered whole on rank 0
            guard.check_before_save(done, tensors)
            run.save_checkpoint(
                Checkpoint(done, tensors, optimizer.state_dict(), {"zero_shot": zero_shot})
            )
            guard.saved(done)
    progress.close()
    reporters.close()
    wall = time.perf_counter() - started
    steps_run = train_cfg.steps - start_step
    if steps_run == 0:
        log(f"{run.path} is at step {start_step} (train.steps) already: nothing to train")

    final = evaluate(setup, dev_examples)
    summary = {
        "run_dir": str(run.path),
        "steps": train_cfg.steps,
        "metric": final["metric"],
        "zero_shot_score": zero_shot["score"] if zero_shot else None,
        "final_score": final["score"],
        "zero_shot_accuracy": zero_shot.get("accuracy") if zero_shot else None,
        "final_accuracy": final.get("accuracy"),
        "final_loss": last_loss(run.path),
        "dev_examples": len(dev_examples),
        "trainable_parameters": setup.trainable.numel(),
        "peak_memory_bytes": peak_memory_bytes(setup.device),
        "device": setup.device.type,
        "processes": parallel.world_size,
        "wall_seconds": wall,
        "steps_per_second": steps_run / wall if steps_run and wall > 0 else None,
        "skipped_steps": sum("skipped" in r.get("extra", {}) for r in run.step_records()),
        "loss_plot": str(run.plot),
    }
    # a resume with nothing to train keeps the summary of the run that trained
    if parallel.is_main and (steps_run or not run.summary.exists()):
        atomic_write_text(run.summary, json.dumps(summary, indent=2) + "\n")
        plot_loss(run)
    return summary


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=start, desc="train", unit="step", disable=not enabled, file=sys.stderr
    )
