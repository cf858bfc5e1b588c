"""Checks a run passes before any model loads: where it writes, the device, the batch.

Each failure is a :class:`~zo.config.ConfigError` (exit code 2) naming the key and the fix,
raised before minutes of loading are spent, and before anything is written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from zo.config import ConfigError, RunConfig
from zo.memory import PlannedEstimator, format_bytes

if TYPE_CHECKING:
    from zo.memory.shapes import ModelShape

DEVICE_TYPES = ("cpu", "cuda", "mps")


# ---------------------------------------------------------------------- the run directory


def check_run_directory(out: str, resume: bool) -> None:
    """``train.out`` names a directory this process can create or write into."""
    if not out.strip():
        raise ConfigError("train.out is empty: name the run directory (train.out=runs/NAME)")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"train.out {path} exists and is not a directory: choose another train.out"
        )
    existing = path
    while not existing.exists():  # the directory that a new run's folders will go into
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"train.out {path}: {existing} is a file, so the run directory cannot be created "
            "there; choose another train.out"
        )
    try:  # a real write: permissions, read-only mounts and pseudo file systems alike
        os.rmdir(tempfile.mkdtemp(prefix=".zo-write-check-", dir=existing))
    except OSError as error:
        what = "the run directory" if existing == path else f"{existing}, where it would go,"
        verb = "continue the run" if resume else "write the run"
        raise ConfigError(
            f"train.out {path}: {what} is not writable ({error.strerror}), so zo cannot "
            f"{verb}; choose another train.out or fix the permissions"
        ) from None


# ---------------------------------------------------------------------- the device


def parse_device(name: str) -> None:
    """``model.device`` is ``auto`` or a device torch knows and zo trains on (no hardware
    needed: ``zo validate`` runs this on any machine)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConfigError(
            f"model.device {name!r} is not a device zo trains on; choose auto, cpu, cuda, "
            "cuda:N (a GPU index) or mps"
        )


def check_device_available(device: torch.device) -> None:
    """The resolved device exists on this machine."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"model.device is {device} but torch sees no CUDA device (a CPU build of "
                "torch, or no GPU visible): use model.device=cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"model.device is {device} but this machine has {torch.cuda.device_count()} "
                f"CUDA device(s): use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device is {device} but MPS is not available: use cpu or auto")


# ---------------------------------------------------------------------- the batch


def check_batch_fits_data(config: RunConfig, examples: int) -> None:
    """A batch larger than the training split repeats examples inside itself: refuse it."""
    batch = config.train.batch_size
    if batch <= examples:
        return
    limited = (
        f" (task.train_limit={config.task.train_limit})"
        if config.task.train_limit is not None
        else ""
    )
    raise ConfigError(
        f"train.batch_size is {batch}, but the training split has {examples} examples"
        f"{limited}: lower train.batch_size to at most {examples} (train.grad_accum adds "
        "micro-batches of that size to a step)"
    )


_MODE_NOTE = {"offload": ", blocks offloaded", "fsdp": ", blocks sharded over {ranks} ranks"}


def check_batch_fits_memory(
    config: RunConfig,
    device: torch.device,
    sequences: int,
    log: Callable[[str], None],
    estimator: PlannedEstimator,
    ranks: int = 1,
) -> None:
    """Refuse a micro-batch of ``sequences`` sequences that ``zo plan`` predicts cannot fit
    in ``device``'s memory; say once why nothing was checked when the planner has no
    memory model for this run. ``estimator`` is the run's, as its registration declares it
    (``EstimatorSpec.planned()``); ``ranks``: the processes a ``train.parallel=fsdp`` run
    shards over. ``train.check_memory=false`` turns it off."""
    if not config.train.check_memory:
        return
    from zo.memory.parallel import plan_offloaded, plan_sharded
    from zo.memory.shapes import PlanError, resolve_shape
    from zo.memory.step import PlanRequest, plan_memory

    try:
        shape = resolve_shape(config.model.name)
    except PlanError as error:
        log(
            f"memory check: zo plan has no memory model for model {config.model.name} "
            f"({error}): the batch is not checked against memory"
        )
        return
    available, where = _memory_of(device)
    try:
        request = PlanRequest(
            shape=shape,
            estimator=estimator,
            model=config.model.name,
            trainable=_planned_trainable(config, shape),
            lora_r=config.trainable.lora_r,
            quant=config.model.quant,
            dtype=config.model.dtype,
            batch=sequences,
            seq_len=config.task.max_length,
            attention="eager"
            if estimator.eager_attention or config.model.attn == "eager"
            else "sdpa",
            gradient_checkpointing=config.train.gradient_checkpointing,
            device=device.type,
            engine=config.engine,
        )
        plan = plan_memory(request) if available is not None else None
        # offloaded onto a GPU, the blocks stay in host memory: the device holds the rest;
        # sharded, each GPU holds its rank's rows of the blocks
        mode = config.train.parallel if device.type == "cuda" else "data"
        if plan is None:
            peak = 0
        elif mode == "offload":
            peak = plan_offloaded(request, config.train.offload_prefetch).device_peak
        elif mode == "fsdp":
            peak = plan_sharded(request, ranks).device_peak
        else:
            peak = plan.process_total
    except PlanError as error:
        log(f"memory check: zo plan has no memory model for this run ({error}): not checked")
        return
    if plan is None:
        log(f"memory check: no memory figure for {where}: the batch is not checked")
        return
    if peak <= available:
        return
    raise ConfigError(
        f"train.batch_size={config.train.batch_size}: zo plan predicts a peak of "
        f"{format_bytes(peak)} for a micro-batch of {sequences} sequences of up to "
        f"{config.task.max_length} tokens ({plan.peak_phase}"
        f"{_MODE_NOTE.get(mode, '').format(ranks=ranks)}), more than the "
        f"{format_bytes(available)} of {where}. Lower train.batch_size (train.grad_accum "
        "keeps the batch) or task.max_length, or set train.check_memory=false to try anyway"
    )


def _planned_trainable(config: RunConfig, shape: ModelShape) -> str:
    """The trainable set in ``zo plan``'s terms (``full``, ``lora:TARGETS``,
    ``mask:DENSITY``)."""
    from zo.memory.shapes import PlanError

    trainable = config.trainable
    if trainable.kind == "full":
        return "full"
    if trainable.kind == "lora":
        return "lora:" + ",".join(trainable.lora_targets)
    if trainable.kind == "names":
        return "names:" + ",".join(trainable.patterns)
    if trainable.kind == "mask" and trainable.path:
        from zo.masks import MaskError, load_mask

        try:
            indices, _ = load_mask(trainable.path)
        except MaskError as error:
            raise ConfigError(f"trainable.path: {error}") from None
        entries = sum(t.numel() for t in indices.values())
        return f"mask:{entries / shape.layer_matrix_parameters():.6g}"
    raise PlanError(f"trainable.kind={trainable.kind} is not in the planner")


def _memory_of(device: torch.device) -> tuple[int | None, str]:
    """Bytes a run may use on ``device`` (None: unknown) and the words for it."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        return total, f"GPU {index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return _available_ram(), "this machine's available RAM"
    return None, f"a {device.type} device"


def _available_ram() -> int | None:
    """MemAvailable of /proc/meminfo (Linux); None elsewhere."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
