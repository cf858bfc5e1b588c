"""``zo bench step | memory | ops | generators``: ratios measured in one run, as JSON + a table.

step:   ZO-SGD step time over the time of two forward passes, and over a naive MeZO
        step (global ``torch.manual_seed``, four dense ``torch.normal`` passes); also each
        one's CPU seconds and minor page faults, which a shared machine's load hardly moves.
ops:    compute operators dispatched by one ZO-SGD step over those of two forwards (each one
        kernel launch or more on a GPU), and the operators that make the host wait for the
        device (:mod:`zo.opcount`); default batch 2 x 16, where launches dominate.
generators: direction values per second of each generator and law on the device, one
        thread and all of them, against torch's own ``normal_``.
memory: peak memory of an estimator's step (ZO-SGD by default, ``--estimators all`` for
        the family) over that of a forward pass, each in a fresh process, measured after
        the model is built (peak RSS reset via clear_refs).

The model is OPT-125m-shaped with random weights (fp32), batch 16 x 64 tokens; the loss
scores the last 4 positions of every sequence (logits only where scored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

from zo.commands.common import HelpFormatter, record_arguments, verb_epilog
from zo.directions import GENERATOR_NAMES
from zo.engine import seeded
from zo.memory import CallCost, measure_call, time_call

EXAMPLE = "zo bench step --layers 4 --repeats 3 | zo bench memory --estimators all"
SCORED = 4


OPT_SHAPES = {  # OPTConfig's defaults are OPT-125m's shape
    "125m": {},
    "1.3b": {
        "hidden_size": 2048,
        "ffn_dim": 8192,
        "num_attention_heads": 32,
        "word_embed_proj_dim": 2048,
    },
}


def build_opt(
    layers: int,
    device: str,
    shape: str = "125m",
    attn: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(num_hidden_layers=layers, **OPT_SHAPES[shape])
    if attn is not None:
        config._attn_implementation = attn
    with seeded(0):
        model = OPTForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def make_batch(batch: int, seq: int, vocab: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(4, vocab, (batch, seq), generator=generator).to(device)


def scored_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss on the last SCORED positions only: no full sequence x vocab logits."""
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, -SCORED - 1 : -1]
    logits = model.get_output_embeddings()(hidden).float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, -SCORED:].reshape(-1)
    )


def full_logits_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """How the reference MeZO code gets its loss: the HF forward with labels."""
    return model(input_ids=ids, labels=ids).loss


@torch.no_grad()
def naive_mezo_step(model, loss_fn, ids, seed: int, lr: float, eps: float) -> float:
    """The reference loop's shape: re-seed the global RNG before each of four passes
    (inside a fork of it, so the caller's generator is left as it was)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data.add_(scale * eps * z)

    with seeded(seed, params[0].device):
        perturb(1)
        plus = loss_fn(model, ids).item()
        perturb(-2)
        minus = loss_fn(model, ids).item()
        perturb(1)
        grad = (plus - minus) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data.add_(-lr * grad * z)
    return plus


def bench_step(args: argparse.Namespace) -> dict:
    from estimators import ZOSGD
    from zo.engine import EngineConfig

    model = build_opt(args.layers, args.device, args.shape, dtype=args.torch_dtype)
    ids = make_batch(args.batch, args.seq, model.config.vocab_size, args.device)
    engine = EngineConfig(threads=args.threads, generator=args.generator)
    optimizer = ZOSGD(model.parameters(), lr=1e-7, eps=1e-3, seed=0, engine=engine)

    def forward() -> None:
        with torch.no_grad():
            scored_loss(model, ids)

    runs = {
        "forward": forward,
        "zo_sgd_step": lambda: optimizer.step(lambda: scored_loss(model, ids)),
        **_baseline_steps(args, model, ids),
        "naive_mezo_same_loss": lambda: naive_mezo_step(model, scored_loss, ids, 1, 1e-7, 1e-3),
        "naive_mezo_full_logits": lambda: naive_mezo_step(
            model, full_logits_loss, ids, 1, 1e-7, 1e-3
        ),
    }
    costs: dict[str, list[CallCost]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up: allocator, kernels, thread pools, bucket plans
        fn()
    for _ in range(args.repeats):  # interleaved, so machine noise hits every method alike
        for name, fn in runs.items():
            costs[name].append(measure_call(fn, args.device))
    timings = {name: [cost.seconds for cost in values] for name, values in costs.items()}
    median = {name: statistics.median(values) for name, values in timings.items()}
    cpu = {
        name: statistics.median(c.user_seconds + c.system_seconds for c in values)
        for name, values in costs.items()
    }
    fastest = {name: min(values) for name, values in timings.items()}
    extra = {
        f"{name}_over_two_forwards": median[name] / (2 * median["forward"])
        for name in median
        if name.startswith("zo_sgd_step_")
    }
    return {
        "benchmark": "step",
        "model": f"opt-{args.shape}-shape ({args.layers} layers) random {args.dtype}",
        "batch": f"{args.batch}x{args.seq}",
        "device": args.device,
        "generator": optimizer.engine.generator_name,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "seconds_median": median,
        "seconds_min": fastest,
        "zo_step_over_two_forwards": median["zo_sgd_step"] / (2 * median["forward"]),
        # on a shared machine the fastest of the interleaved repeats is the least disturbed
        "zo_step_over_two_forwards_min": fastest["zo_sgd_step"] / (2 * fastest["forward"]),
        "speedup_vs_naive_mezo_same_loss_min": fastest["naive_mezo_same_loss"]
        / fastest["zo_sgd_step"],
        "speedup_vs_naive_mezo_same_loss": median["naive_mezo_same_loss"] / median["zo_sgd_step"],
        "speedup_vs_naive_mezo_full_logits": median["naive_mezo_full_logits"]
        / median["zo_sgd_step"],
        **extra,
        "seconds_all": {name: [round(v, 4) for v in values] for name, values in timings.items()},
        # CPU time and page faults barely move with other load (wall time does): on a shared
        # machine they say what a method costs; CPU time counts every thread of the process
        "cpu_seconds_median": cpu,
        "system_seconds_median": {
            name: statistics.median(c.system_seconds for c in values)
            for name, values in costs.items()
        },
        "minor_faults_median": {
            name: statistics.median(c.minor_faults for c in values)
            for name, values in costs.items()
        },
        "zo_step_over_two_forwards_cpu": cpu["zo_sgd_step"] / (2 * cpu["forward"]),
    }


def _baseline_steps(args: argparse.Namespace, model, ids) -> dict[str, Callable[[], float]]:
    """ZO-SGD steps with other engine settings, timed in the same run (``--also``)."""
    from estimators import ZOSGD
    from zo.engine import EngineConfig

    runs = {}
    for setting in filter(None, args.also.split(",")):
        fields = {
            key: int(value) if value.isdigit() else value
            for key, value in (part.split("=", 1) for part in setting.split(":"))
        }
        engine = EngineConfig(**{"threads": args.threads, **fields})
        optimizer = ZOSGD(model.parameters(), lr=1e-7, eps=1e-3, seed=0, engine=engine)
        name = "_".join(f"{k}_{v}".replace("-", "_") for k, v in fields.items())
        runs[f"zo_sgd_step_{name}"] = partial(optimizer.step, partial(scored_loss, model, ids))
    return runs


def bench_ops(args: argparse.Namespace) -> dict:
    from estimators import ZOSGD
    from zo.engine import ACCELERATOR_BUCKET, ACCELERATOR_CHUNK, EngineConfig, resolve_generator
    from zo.opcount import OpCounter

    model = build_opt(args.layers, args.device, args.shape, dtype=args.torch_dtype)
    ids = make_batch(args.batch, args.seq, model.config.vocab_size, args.device)
    # One drawing thread: a dispatch mode sees only the thread it runs in. The accelerator's
    # chunk and bucket sizes, so the count is the one a GPU would launch.
    config = EngineConfig(
        threads=1,
        generator=args.generator,
        chunk_size=ACCELERATOR_CHUNK,
        bucket_size=ACCELERATOR_BUCKET,
    )
    optimizer = ZOSGD(model.parameters(), lr=1e-7, eps=1e-3, seed=0, engine=config)
    optimizer.step(lambda: scored_loss(model, ids))  # warm-up: the bucket plan is learned
    with torch.no_grad(), OpCounter() as forward:
        scored_loss(model, ids)
    with OpCounter() as step:
        optimizer.step(lambda: scored_loss(model, ids))
    forward_ops, step_ops = forward.result.total, step.result.total
    return {
        "benchmark": "ops",
        "model": f"opt-{args.shape}-shape ({args.layers} layers) random {args.dtype}",
        "batch": f"{args.batch}x{args.seq}",
        "device": args.device,
        "generator": resolve_generator(config, args.device),
        "trainable_tensors": len(optimizer.engine.tensors),
        "forward_compute_ops": forward_ops,
        "zo_sgd_step_compute_ops": step_ops,
        "step_ops_over_two_forwards": step_ops / (2 * forward_ops),
        "step_sync_ops": len(step.result.syncs),
        "step_sync_op_names": ",".join(name for _, name in step.result.syncs) or "none",
        "step_top_ops": step.result.top(),
    }


def bench_generators(args: argparse.Namespace) -> dict:
    """Values per second of every generator and law, and of ``normal_`` (the platform's)."""
    from zo.directions import generators, run_jobs

    numel = 1 << 22
    out = torch.empty(numel, device=args.device)
    threads = torch.get_num_threads()
    reference = torch.Generator(device=args.device).manual_seed(0)
    runs: dict[str, Callable[[], None]] = {
        "torch_normal_": lambda: out.normal_(generator=reference),
    }
    for name, cls in generators().items():
        for law in ("gaussian", "rademacher"):
            for workers in sorted({1, threads}):
                generator = cls(law, workers)
                step = generator.job_size()
                runs[f"{name}_{law}_{workers}t"] = _filler(generator, out, step, workers, run_jobs)
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(args.repeats):  # interleaved, so machine noise hits every one alike
        for name, fn in runs.items():
            timings[name].append(time_call(fn, args.device))
    rates = {name: numel / statistics.median(t) / 1e6 for name, t in timings.items()}
    return {
        "benchmark": "generators",
        "device": args.device,
        "elements": numel,
        "repeats": args.repeats,
        "million_values_per_second": rates,
        "over_torch_normal_": {n: r / rates["torch_normal_"] for n, r in rates.items()},
    }


def _filler(generator, out, step, workers, run_jobs) -> Callable[[], None]:
    numel = out.numel()

    def fill() -> None:
        if out.device.type != "cpu" or workers == 1:
            generator.fill(out, 1, 0, 0)
            return
        jobs = [partial(generator.fill, out[a : a + step], 1, 0, a) for a in range(0, numel, step)]
        run_jobs(jobs, workers)

    return fill


def memory_worker(args: argparse.Namespace) -> dict:
    """One fresh process: build, reset the peak, run `mode` twice, report peaks.

    ``mode`` is ``forward`` (inference, no grad) or a registered estimator's name, run
    with its default config (a tiny lr: the update's cost, not its effect, is measured).
    """
    import gc

    import estimators
    from zo.engine import EngineConfig
    from zo.memory import (
        current_rss_bytes,
        peak_memory_bytes,
        reset_peak_memory,
        return_large_frees_to_os,
    )

    if not args.default_malloc:
        return_large_frees_to_os()

    spec = None if args.mode == "forward" else estimators.get_estimator(args.mode)
    eager = spec is not None and spec.traits.eager_attention
    model = build_opt(
        args.layers,
        args.device,
        args.shape,
        attn="eager" if eager else None,
        dtype=args.torch_dtype,
    )
    ids = make_batch(args.batch, args.seq, model.config.vocab_size, args.device)
    optimizer = None
    if spec is not None:
        optimizer = estimators.build_estimator(
            spec.name,
            list(model.named_parameters()),
            model=model,
            seed=0,
            engine=EngineConfig(threads=args.threads, generator=args.generator),
            **({"lr": 1e-7} if "lr" in _config_fields(spec) else {}),
            **MEMORY_SETTINGS.get(spec.name, lambda _: {})(args),
        )
    gc.collect()
    baseline = torch.cuda.memory_allocated() if args.device == "cuda" else current_rss_bytes()
    reset_peak_memory(args.device)
    for _ in range(2):
        if optimizer is None:
            with torch.no_grad():
                scored_loss(model, ids)
        else:
            optimizer.step(lambda: scored_loss(model, ids))
    peak = peak_memory_bytes(args.device)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "mode": args.mode,
        "parameters": parameters,
        "baseline_bytes": baseline,
        "peak_bytes": peak,
    }


# Estimators whose defaults leave a required choice open get the setting the literature
# measures: hybrid trains the last decoder layer first-order and the rest with ZO.
MEMORY_SETTINGS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "hybrid": lambda args: {"first_order": [f"*.layers.{args.layers - 1}.*"]},
}


def _config_fields(spec) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(spec.config_class)}


def bench_memory(args: argparse.Namespace) -> dict:
    """Peaks of each estimator's step next to a forward pass, one fresh process each.

    ``extra`` is the peak above the footprint once the model is built: on a small model
    the fixed runtime (Python, torch, allocator arenas) would otherwise hide differences.
    """
    import estimators

    names = estimators.available_estimators() if args.estimators == "all" else args.estimators
    names = [n for n in (names.split(",") if isinstance(names, str) else names) if n]
    for name in names:
        estimators.get_estimator(name)  # an unknown name fails before any process starts
    results = {}
    for mode in ("forward", *names):
        command = [sys.executable, "-m", "zo.commands.bench", "memory-worker", "--mode", mode]
        command += ["--shape", args.shape, "--layers", str(args.layers)]
        command += ["--batch", str(args.batch), "--seq", str(args.seq)]
        command += ["--device", args.device, "--threads", str(args.threads)]
        command += ["--generator", args.generator, "--dtype", args.dtype]
        command += ["--default-malloc"] if args.default_malloc else []
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    forward = results["forward"]
    forward_extra = max(1, forward["peak_bytes"] - forward["baseline_bytes"])
    result: dict = {
        "benchmark": "memory",
        "model": f"opt-{args.shape}-shape ({args.layers} layers) random {args.dtype}",
        "batch": f"{args.batch}x{args.seq}",
        "device": args.device,
        "malloc": "glibc default" if args.default_malloc else "fixed mmap threshold (1 MiB)",
        "parameters": forward["parameters"],
        "model_built_bytes": forward["baseline_bytes"],
        "forward_peak_bytes": forward["peak_bytes"],
    }
    extras = {}
    for name in names:
        run = results[name]
        extras[name] = run["peak_bytes"] - run["baseline_bytes"]
        result[f"{name}_peak_bytes"] = run["peak_bytes"]
        result[f"{name}_peak_over_forward_peak"] = run["peak_bytes"] / forward["peak_bytes"]
        result[f"{name}_extra_over_forward_extra"] = extras[name] / forward_extra
    if "adamw" in extras and "lomo" in extras:
        result["adamw_extra_over_lomo_extra"] = extras["adamw"] / max(1, extras["lomo"])
    return result


def _table(result: dict) -> str:
    rows = []
    for key, value in result.items():
        if isinstance(value, dict):
            rows += [f"| {key}.{k} | {_fmt(k, v)} |" for k, v in value.items()]
        else:
            rows.append(f"| {key} | {_fmt(key, value)} |")
    return "| metric | value |\n|---|---|\n" + "\n".join(rows)


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and key.endswith("bytes"):
        return f"{value / 2**20:.1f} MiB"
    return str(value)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name()})"
    return f"{device} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def record(result: dict, command: str, results: Path) -> None:
    """Append ``result`` as a table, with the command that measured it, to ``results``."""
    results.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(results, "a") as handle:
        handle.write(
            f"\n### bench {result['benchmark']} ({stamp}, {device_name(result['device'])})\n\n"
            f"`{command}`\n\n{_table(result)}\n"
        )


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``step``, ``memory`` and the memory worker."""
    parser.add_argument(
        "--shape", choices=sorted(OPT_SHAPES), default="125m", help="OPT model shape"
    )
    parser.add_argument("--layers", type=int, default=None, help="default: 12 (125m), 24 (1.3b)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs",
    )
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0 = auto)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (step)")
    parser.add_argument(
        "--generator",
        default="auto",
        choices=["auto", *GENERATOR_NAMES, "torch-chunks-v1"],
        help="engine.generator for step, ops and memory (auto: by device)",
    )
    # the memory worker's: forward or an estimator (bench_memory starts one process per mode)
    parser.add_argument("--mode", default="forward", help=argparse.SUPPRESS)
    parser.add_argument(
        "--estimators",
        default="zo_sgd",
        help="memory: comma-separated estimator names, or `all` (default: zo_sgd)",
    )
    parser.add_argument(
        "--also",
        default="",
        help="step: more engine settings timed in the same run, comma-separated, fields joined "
        "by ':' (e.g. generator=torch-chunks-v1,distribution=rademacher)",
    )
    record_arguments(parser)
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's adaptive mmap threshold"
    )


BENCHMARKS = {
    "step": bench_step,
    "memory": bench_memory,
    "ops": bench_ops,
    "generators": bench_generators,
    "memory-worker": memory_worker,
}
OTHER_BENCHMARKS = {"compare": "zo.commands.compare", "eval": "zo.commands.bench_eval"}
"""Benchmarks with their own module: name -> module (``add_arguments``, ``run``, ``EXAMPLE``)."""
EXAMPLES = {
    "step": "zo bench step --layers 4 --repeats 3",
    "memory": "zo bench memory --estimators zo_sgd,zo_adam --layers 4",
    "ops": "zo bench ops --layers 2",
    "generators": "zo bench generators --device cpu",
}


def description(name: str, doc: str) -> str:
    """The paragraph of ``doc`` about ``name`` (``name:`` and its indented lines)."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}:"))
    end = next(
        (i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines)
    )
    return "\n".join(line.strip() for line in lines[start:end]).removeprefix(f"{name}:").strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    import importlib

    sub = parser.add_subparsers(dest="what", required=True, metavar="BENCHMARK")
    for name in [*BENCHMARKS, *OTHER_BENCHMARKS]:
        if name == "memory-worker":
            continue  # started by `memory`, one process per mode
        if name in BENCHMARKS:
            text, add, run_one = description(name, __doc__), bench_arguments, run_benchmark
            example = EXAMPLES[name]
        else:
            module = importlib.import_module(OTHER_BENCHMARKS[name])
            text, add, run_one = module.__doc__, module.add_arguments, module.run
            example = module.EXAMPLE
        bench = sub.add_parser(
            name,
            help=" ".join(text.split()).removeprefix(f"``zo bench {name}``: ").split(". ")[0],
            description=text,
            epilog=verb_epilog(example),
            formatter_class=HelpFormatter,
        )
        add(bench)
        bench.set_defaults(benchmark=run_one)


def run(args: argparse.Namespace) -> int:
    return args.benchmark(args)


def run_benchmark(args: argparse.Namespace) -> int:
    if args.layers is None:
        args.layers = 24 if args.shape == "1.3b" else 12
    args.torch_dtype = getattr(torch, args.dtype)
    if args.what == "ops" and "--batch" not in args.argv and "--seq" not in args.argv:
        args.batch, args.seq = 2, 16  # the count: a small batch, where launches dominate
    result = BENCHMARKS[args.what](args)
    print(json.dumps(result))
    if args.what != "memory-worker":
        print(_table(result))
        if args.record:
            record(result, " ".join(["zo", *args.argv]), args.results)
    return 0


def main(what: str, argv: list[str]) -> int:
    """A benchmark without the ``zo`` command (how ``memory`` starts its workers)."""
    parser = argparse.ArgumentParser(prog=f"zo bench {what}")
    bench_arguments(parser)
    args = parser.parse_args(argv)
    args.what, args.argv = what, ["bench", what, *argv]
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
