"""``zo plan``: does it fit, and how? The command over :mod:`zo.memory`'s planner.

    zo plan --model llama-2-7b --quant nf4 --trainable mask:0.001 --device cuda --dtype bf16
    zo plan --model HF_ID_OR_DIR --budget 8GiB [--json]
    zo plan --config experiments/smollm2/sst2_zo.yaml --budget 4GiB
    zo plan --model opt-66b --dtype bfloat16 --gpus 8 --gpu-memory 80GiB [--json]

Without ``--budget`` it prints one plan, component by component. With ``--budget`` it lists
the configurations that fit (quantization, trainable set, estimator, batch, sequence
length, activation checkpointing), best first; what you give stays fixed, the rest is
searched. With ``--gpus``/``--gpu-memory`` it predicts the per-rank peak of sharded ZO over
N devices and the device peak and host memory of offloaded ZO, beside one device's, and
says which fit (:mod:`zo.commands.plan_parallel`). Unset settings are ``zo train``'s
defaults (a ``--config`` file's values first), and every assumption is echoed. The estimators' memory traits come from their registrations.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

import estimators
from zo.commands import plan_parallel
from zo.config import ConfigError, ModelConfig, RunConfig, TaskConfig, TrainableConfig, load_config
from zo.engine import EngineConfig
from zo.memory.report import (
    assumptions,
    format_assumptions,
    plan_table,
    search_dict,
    search_table,
)
from zo.memory.search import SearchSpace, parse_budget, search, smallest
from zo.memory.shapes import (
    CONFIG_KEYS,
    PRESETS,
    PlanError,
    resolve_config,
    shape_from_config,
    with_overrides,
)
from zo.memory.step import GIB, PlanRequest, parse_trainable, plan_memory

SHAPE_OPTIONS = tuple(CONFIG_KEYS)
DEFAULTS = "zo train's default"


EXAMPLE = (
    "zo plan --model llama-2-7b --estimator zo_sgd --trainable mask:0.001 --quant nf4 "
    "--batch 16 --seq 256"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (a name, directory or config; shape overrides)")
    model.add_argument(
        "--model",
        help=f"a preset ({', '.join(sorted(PRESETS))}), a model of `zo list models`, a "
        "checkpoint directory or config.json, or a cached hub id",
    )
    model.add_argument("--config", help="a run config (zo train --config): its settings")
    model.add_argument("--family", help="build the shape from a zo family (with the options)")
    for name in SHAPE_OPTIONS:
        if name != "tied_embeddings":
            keys = " / ".join(CONFIG_KEYS[name])
            model.add_argument(
                f"--{name.replace('_', '-')}", type=int, dest=name, help=f"sets the config's {keys}"
            )
    tied = model.add_mutually_exclusive_group()
    tied.add_argument(
        "--tied",
        dest="tied_embeddings",
        action="store_true",
        default=None,
        help="the output layer shares the input embedding (default: as the config says)",
    )
    tied.add_argument(
        "--untied",
        dest="tied_embeddings",
        action="store_false",
        help="the output layer has its own weights (default: as the config says)",
    )
    run = parser.add_argument_group("run (unset: zo train's defaults; searched with --budget)")
    run.add_argument("--estimator", help=f"one of {estimators.available_estimators()}")
    run.add_argument(
        "--trainable", help="full | names:PATTERNS | lora | lora:TARGETS | mask:DENSITY | mask:PATH"
    )
    run.add_argument("--lora-r", type=int, help=f"LoRA rank (default {TrainableConfig.lora_r})")
    run.add_argument("--quant", help="none | nf4")
    run.add_argument("--dtype", help=f"weights (default {ModelConfig.dtype}): float32 | bfloat16")
    run.add_argument("--compute-dtype", help="NF4 compute dtype (default: --dtype)")
    run.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NF4: quantize the quantization constants too",
    )
    run.add_argument("--batch", type=int, help="sequences per micro-batch (the most to try)")
    run.add_argument(
        "--seq", "--seq-len", type=int, dest="seq_len", help="tokens per sequence (the most to try)"
    )
    run.add_argument("--scored", type=int, default=1, help="scored positions per sequence")
    run.add_argument("--logits", default="scored", help="scored | full")
    run.add_argument("--attention", help="sdpa | eager (default: the model's, as zo train)")
    run.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations block by block (unset: as zo train; searched with --budget)",
    )
    run.add_argument("--device", help="cuda | cpu (default: auto, as zo train)")
    run.add_argument("--chunk-size", type=int, help="engine.chunk_size")
    run.add_argument("--threads", type=int, help="engine.threads")
    search_group = parser.add_argument_group("search")
    search_group.add_argument("--budget", help="memory to fit in: 8GiB, 24G, 80GB, 512MiB")
    search_group.add_argument("--top", type=int, default=20, help="rows to print (0: all)")
    plan_parallel.add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan or the fits as JSON")


def run(options: argparse.Namespace) -> int:
    try:
        return _run(options)
    except (PlanError, ConfigError, estimators.UnknownEstimatorError) as error:
        print(f"zo plan: error: {error}", file=sys.stderr)
        return 2


def _run(options: argparse.Namespace) -> int:
    base, sources, given = request_from_options(options)
    echo = assumptions(base, sources)
    if plan_parallel.wanted(options):
        result = plan_parallel.report(base, options)
        if options.json:
            print(json.dumps({**result, "assumptions": echo}, indent=2))
        else:
            print(format_assumptions(echo))
            print(plan_parallel.table(result))
        return 0
    if options.budget is None:
        plan = plan_memory(base)
        if options.json:
            print(json.dumps({**plan.to_dict(), "assumptions": echo}, indent=2))
        else:
            print(format_assumptions(echo))
            print(
                f"{plan.parameters / 1e9:.3f} B parameters, {plan.trainable_parameters:,} trainable"
            )
            print(plan_table(plan))
        return 0
    budget = parse_budget(options.budget)
    space = SearchSpace(
        estimators=[base.estimator] if "estimator" in given else _all_estimators(),
        trainables=(base.trainable,) if "trainable" in given else SearchSpace.trainables,
        quants=(base.quant,) if "quant" in given else SearchSpace.quants,
        checkpointing=(
            (base.gradient_checkpointing,)
            if "gradient_checkpointing" in given
            else SearchSpace.checkpointing
        ),
    )
    result = search(base, space, budget)
    if not result.fits:
        least = smallest(base, space)
        hint = (
            f"the smallest, {least.request.estimator.name} {least.request.trainable} "
            f"quant={least.request.quant} at batch 1 x {least.request.seq_len} tokens, needs "
            f"{least.process_total / GIB:.2f} GiB"
            if least is not None
            else "every combination was refused: " + "; ".join(result.refused.values())
        )
        raise PlanError(
            f"nothing fits in {budget / GIB:.2f} GiB ({hint}): raise --budget, or free the "
            "settings you fixed (--quant, --trainable, --estimator, --dtype)"
        )
    if options.json:
        print(json.dumps(search_dict(result, budget, echo), indent=2))
    else:
        print(format_assumptions(echo))
        print(search_table(result, budget, options.top or None))
    return 0


def _all_estimators() -> list:
    return [estimators.get_estimator(name).planned() for name in estimators.available_estimators()]


def request_from_options(
    options: argparse.Namespace,
) -> tuple[PlanRequest, dict[str, str], set[str]]:
    """The request (fixed settings, and the largest batch/sequence to try), where each
    setting came from, and which ones the user fixed (command line or ``--config``)."""
    config = load_config(options.config) if options.config else None
    origin = f"config {options.config}" if options.config else ""
    settings = _settings_from_config(config) if config is not None else {}
    sources = {key: origin for key in settings}
    for key in (
        "estimator", "trainable", "lora_r", "quant", "dtype", "batch", "seq_len",
        "attention", "gradient_checkpointing", "device",
    ):  # fmt: skip
        value = getattr(options, key, None)
        if value is not None:
            settings[key], sources[key] = value, "given"
    model_name = options.model or settings.pop("model", None)
    if options.model:
        sources["model"] = "given"
    given = set(settings)

    if options.family:
        shape_config = _family_config(options)
        model_label = f"tiny-shaped {options.family}"
    elif model_name:
        resolved = resolve_config(model_name)
        shape_config, model_label = resolved.config, f"{model_name} ({resolved.source})"
    else:
        raise PlanError("give --model (a name, directory or config.json), --config or --family")
    overrides = {name: getattr(options, name, None) for name in SHAPE_OPTIONS}
    shape = shape_from_config(with_overrides(shape_config, **overrides))

    estimator = estimators.get_estimator(settings.get("estimator", _default_estimator()))
    device = _device(settings.get("device", ModelConfig.device))
    sources.setdefault("device", f"{DEFAULTS} (auto)")
    attention = settings.get("attention") or _default_attention(shape.model_type)
    if estimator.traits.eager_attention and "attention" not in settings:
        attention, sources["attention"] = "eager", f"{estimator.name} registers eager_attention"
    trainable = settings.get("trainable", "full")
    if trainable.startswith("mask:") and not _is_density(trainable):
        trainable = _mask_density(trainable.removeprefix("mask:"), shape)
    engine = config.engine if config is not None else EngineConfig()
    if config is not None:
        sources["engine"] = origin
    engine = replace(
        engine,
        **{
            k: v
            for k, v in (("chunk_size", options.chunk_size), ("threads", options.threads))
            if v is not None
        },
    )
    request = PlanRequest(
        shape=shape,
        estimator=estimator.planned(),
        model=model_label,
        trainable=trainable,
        lora_r=settings.get("lora_r", TrainableConfig.lora_r),
        quant=settings.get("quant", ModelConfig.quant),
        dtype=settings.get("dtype", ModelConfig.dtype),
        compute_dtype=options.compute_dtype,
        double_quant=options.double_quant,
        batch=settings.get("batch", RunConfig().train.batch_size),
        seq_len=settings.get("seq_len", TaskConfig.max_length),
        scored=options.scored,
        logits=options.logits,
        attention=attention,
        gradient_checkpointing=settings.get("gradient_checkpointing", False),
        device=device,
        engine=engine,
    )
    parse_trainable(request.trainable, request.lora_r)  # a usage error before any search
    for key in ("estimator", "trainable", "lora_r", "quant", "dtype", "batch", "seq_len"):
        sources.setdefault(key, DEFAULTS)
    sources.setdefault("gradient_checkpointing", DEFAULTS)
    sources.setdefault("attention", "the model's default attention, as zo train loads it")
    sources["model"] = sources.get("model", origin or "given")
    return request, sources, given


def _settings_from_config(config: RunConfig) -> dict[str, Any]:
    """A run config's settings in the planner's terms (every one counts as fixed)."""
    trainable = config.trainable
    if trainable.kind == "lora":
        planned = "lora:" + ",".join(trainable.lora_targets)
    elif trainable.kind == "mask":
        planned = f"mask:{trainable.path}"
    elif trainable.kind == "names":
        planned = "names:" + ",".join(trainable.patterns)
    else:
        planned = trainable.kind
    settings: dict[str, Any] = {
        "model": config.model.name,
        "estimator": str(config.estimator.get("name")),
        "trainable": planned,
        "lora_r": trainable.lora_r,
        "quant": config.model.quant,
        "dtype": config.model.dtype,
        "batch": config.train.batch_size,  # a micro-batch; grad_accum adds more of them
        "seq_len": config.task.max_length,
        "gradient_checkpointing": config.train.gradient_checkpointing,
        "device": config.model.device,
    }
    if config.model.attn:
        settings["attention"] = config.model.attn
    return settings


def _default_estimator() -> str:
    return str(RunConfig().estimator["name"])


def _device(name: str) -> str:
    """``auto`` as ``zo train`` resolves it: CUDA when this machine has it."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name.split(":")[0]


def _default_attention(model_type: str) -> str:
    from zo.models import family_of

    family = family_of(model_type)
    return family.traits.default_attn if family is not None else "sdpa"


def _is_density(trainable: str) -> bool:
    try:
        float(trainable.removeprefix("mask:"))
    except ValueError:
        return False
    return True


def _mask_density(path: str, shape) -> str:
    """``mask:PATH`` as ``mask:DENSITY``: the file's entries over the blocks' matrices."""
    from zo.masks import MaskError, load_mask

    try:
        indices, _ = load_mask(path)
    except (MaskError, OSError) as error:
        raise PlanError(f"trainable mask:{path}: {error}") from None
    entries = sum(t.numel() for t in indices.values())
    return f"mask:{entries / shape.layer_matrix_parameters():.6g}"


def _family_config(options: argparse.Namespace):
    """A config of zo family ``--family`` at the given dimensions (the rest tiny)."""
    from zo.models import TinySpec, available_families, tiny_config

    if options.family not in available_families():
        raise PlanError(
            f"family {options.family!r} is unknown; choose one of {available_families()}"
        )
    required = ("hidden", "layers", "intermediate", "heads", "vocab")
    missing = [f"--{n}" for n in required if getattr(options, n) is None]
    if missing:
        raise PlanError(f"give --model, or the whole shape: missing {' '.join(missing)}")
    spec = TinySpec(
        vocab_size=options.vocab,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_positions=options.max_positions or 2048,
        hidden=options.hidden,
        heads=options.heads,
        intermediate=options.intermediate,
        layers=options.layers,
    )
    config = tiny_config(options.family, spec)
    if getattr(config, "num_key_value_heads", None) and options.kv_heads is None:
        config.num_key_value_heads = options.heads  # no grouped-query attention unless asked
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zo plan", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
