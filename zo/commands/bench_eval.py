"""``zo bench eval``: batched evaluation against the anchors' one-at-a-time way, one run.

scoring:    examples/s of `tasks.evaluation.candidate_scores` (every candidate of
            `--batch-size` examples in one padded forward, logits only at scored
            positions) over scoring one (example, candidate) pair per forward with the
            full [length, vocab] logits, as the reference MeZO code does. Tasks: the
            bundled sentiment task (two one-token candidates), a five-candidate variant
            of it with multi-token candidates, and suite tasks (COPA, ReCoRD by default)
            on their fixture rows, cycled up to `--examples` (they hold a handful);
            `record-4x` reads each ReCoRD fixture passage four times over, nearer the
            length of real passages.
            The batched way uses `--prefix-cache` (default "auto": each shared prompt
            runs once, its KV cache serves the candidates, where `tasks.prefix_cache`
            finds that it pays); unless that is "never", the batched way without the
            cache runs too, and "cache gain" is its time over the batched way's.
generation: tokens/s of `tasks.generation.greedy_generate` (left-padded batches, KV cache,
            one logit row per step) over decoding one prompt at a time without a cache,
            full logits at every step.

Both ways run on the same model, examples and settings, after one warm-up each, and
alternate batch by batch, so that load from other processes falls on both alike; with
`--rounds R` the scoring ways repeat R times and report their median times. The
agreement columns say whether they computed the same thing (argmax predictions, max
|score difference|; identical greedy token sequences). The model is the bundled
SmolLM2-135M-Instruct (`zo.models.bundled_model_dir`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import torch

import tasks
from tasks.encoding import bos_prefix, rows_of
from tasks.evaluation import EvalSettings, candidate_scores
from tasks.generation import GreedyConfig, eos_ids, greedy_generate
from tasks.lm import PREFIX_CACHE_MODES
from zo.commands.common import record_arguments

EXAMPLE = "zo bench eval --tasks sentiment,copa --examples 16 --rounds 3"

# A multi-candidate variant of the bundled task: five candidates of one to four tokens, so
# the batched layout needs a sequence per multi-token candidate (the labels stay 0 and 1).
FIVE_WAY_VERBALIZER = {
    0: " terrible",
    1: " great",
    2: " okay, I guess",
    3: " not what I expected",
    4: " absolutely wonderful",
}


class RepeatedPrompts:
    """A task whose prompts are read `times` over, all else delegated: ReCoRD's fixture
    passages (~30 tokens) are several times shorter than real ones (hundreds, cut at
    max_length), and the prefix cache's gain grows with the prompt."""

    def __init__(self, task: tasks.Task, times: int) -> None:
        self.task, self.times = task, times

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def prompt(self, example: Any) -> str:
        return self.task.prompt(example) * self.times


BENCH_TASKS: dict[str, Callable[[], Any]] = {
    "sentiment": lambda: tasks.get_task("sentiment"),
    "sentiment-5way": lambda: tasks.get_task("sentiment", verbalizer=FIVE_WAY_VERBALIZER),
    "record-4x": lambda: RepeatedPrompts(tasks.get_task("record", fixtures=True), 4),
}
GENERATION_TEMPLATE = "Review: {text}\nA reply from the shop owner:"


def build_task(name: str, fixtures: bool = False) -> tasks.Task:
    """A bench variant by name, else a registered task (a suite task on its fixture rows
    when `fixtures`)."""
    if name in BENCH_TASKS:
        return BENCH_TASKS[name]()
    return tasks.get_task(name, **({"fixtures": True} if fixtures else {}))


def bench_examples(task: tasks.Task, splits: Sequence[str], count: int) -> tuple[list, int]:
    """`count` examples pooled from the task's `splits` (those it has), cycled when there are
    fewer: the suite's fixtures hold a handful. Also the number of distinct examples."""
    pooled, errors = [], []
    for split in splits:
        try:
            pooled += task.load(split)
        except tasks.TaskError as error:  # a split the task lacks (sentiment has no test)
            errors.append(error)
    if not pooled:
        raise errors[0] if errors else tasks.TaskError(f"task {task.name!r}: no examples")
    distinct = pooled[:count]
    return [distinct[i % len(distinct)] for i in range(count)], len(distinct)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


# ------------------------------------------------------------------------ the anchors


def anchor_scores(model: Any, tokenizer: Any, task: tasks.Task, examples: Sequence) -> list:
    """Per example, [C] mean token log-likelihoods: one pair per forward, full logits."""
    bos = bos_prefix(tokenizer)
    device = model.device
    scores = []
    for row in rows_of(task, examples):
        per_candidate = []
        # a candidate is read after its own prompt (WinoGrande's partial scoring), else
        # after the row's shared one
        for prompt, candidate in zip(row.candidate_prompts, row.candidates, strict=True):
            context = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer = tokenizer(candidate, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + answer], device=device)
            log_probs = model(input_ids=ids).logits[0].float().log_softmax(dim=-1)
            picked = [log_probs[len(context) - 1 + j, t] for j, t in enumerate(answer)]
            per_candidate.append(torch.stack(picked).mean())
        scores.append(torch.stack(per_candidate).cpu())
    return scores


def anchor_greedy(model: Any, tokenizer: Any, prompt: str, config: GreedyConfig) -> list[int]:
    """Greedy decoding of one prompt, no cache: a full forward and full logits per token."""
    ids = bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    eos = eos_ids(tokenizer, model)
    generated: list[int] = []
    for _ in range(config.max_new_tokens):
        inputs = torch.tensor([ids + generated], device=model.device)
        token = int(model(input_ids=inputs, use_cache=False).logits[0, -1].argmax())
        generated.append(token)
        if token in eos:
            break
    return generated


# --------------------------------------------------------------------- measurements


def chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def interleaved_ways(
    parts: list, ways: dict[str, Callable[[Any], list]], device
) -> dict[str, tuple[float, list]]:
    """Every way over the same parts, taking turns part by part, so that load from other
    processes on a shared machine falls on all alike; per way, summed time and results."""
    results: dict[str, tuple[float, list]] = {name: (0.0, []) for name in ways}
    for part in parts:
        for name, way in ways.items():
            seconds, out = timed(lambda part=part, way=way: way(part), device)
            total, outputs = results[name]
            results[name] = (total + seconds, outputs + out)
    return results


def interleaved(
    parts: list, batched: Callable[[Any], list], anchor: Callable[[Any], list], device
) -> tuple[float, list, float, list]:
    """`interleaved_ways` of two ways: batched then anchor, their times and results."""
    results = interleaved_ways(parts, {"batched": batched, "anchor": anchor}, device)
    return (*results["batched"], *results["anchor"])


def repeated(
    parts: list, ways: dict[str, Callable[[Any], list]], device, rounds: int
) -> dict[str, tuple[float, list]]:
    """`interleaved_ways` `rounds` times: per way, the median of its round times (a burst of
    load on a shared machine moves a median less than a sum) and the first round's results."""
    runs = [interleaved_ways(parts, ways, device) for _ in range(rounds)]
    return {
        name: (statistics.median(run[name][0] for run in runs), runs[0][name][1]) for name in ways
    }


def agreement(scores: list, reference: list) -> tuple[int, float]:
    """Equal argmax predictions, and the max |score difference| over all candidates."""
    same = sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(scores, reference, strict=True))
    gap = max(float((a - b).abs().max()) for a, b in zip(scores, reference, strict=True))
    return same, gap


def bench_scoring(model: Any, tokenizer: Any, task: tasks.Task, examples: list, args) -> dict:
    """One `--batch-size` batch of examples per batched call, as `evaluate` scores them."""
    settings = EvalSettings(
        batch_size=args.batch_size, max_length=args.max_length, prefix_cache=args.prefix_cache
    )
    ways = {
        "batched": lambda part: candidate_scores(model, tokenizer, task, part, settings),
        "anchor": lambda part: anchor_scores(model, tokenizer, task, part),
    }
    if args.prefix_cache != "never":
        uncached = replace(settings, prefix_cache="never")
        ways["uncached"] = lambda part: candidate_scores(model, tokenizer, task, part, uncached)
    for way in ways.values():
        way(examples[:2])  # warm-up
    results = repeated(chunks(examples, args.batch_size), ways, model.device, args.rounds)
    (batched_s, batched), (anchor_s, anchored) = results["batched"], results["anchor"]
    same, gap = agreement(batched, anchored)
    result = {
        "task": task.name,
        "examples": len(examples),
        "candidate_pairs": sum(len(s) for s in batched),
        "anchor_examples_per_s": len(examples) / anchor_s,
        "batched_examples_per_s": len(examples) / batched_s,
        "speedup": anchor_s / batched_s,
        "same_predictions": f"{same}/{len(examples)}",
        "max_abs_score_difference": gap,
    }
    if "uncached" in results:
        uncached_s, uncached_scores = results["uncached"]
        same_uncached, gap_uncached = agreement(batched, uncached_scores)
        result |= {
            "uncached_examples_per_s": len(examples) / uncached_s,
            "uncached_speedup": anchor_s / uncached_s,
            "cache_gain": uncached_s / batched_s,
            "same_predictions_as_uncached": f"{same_uncached}/{len(examples)}",
            "max_abs_difference_to_uncached": gap_uncached,
        }
    return result


def bench_generation(model: Any, tokenizer: Any, prompts: list[str], args) -> dict:
    # No stop string: every row decodes until EOS or max_new_tokens, on both sides alike.
    config = GreedyConfig(max_new_tokens=args.new_tokens, max_length=args.max_length, stop=())

    greedy_generate(model, tokenizer, prompts[:2], replace(config, max_new_tokens=4))  # warm-up
    anchor_greedy(model, tokenizer, prompts[0], replace(config, max_new_tokens=4))
    batched_s, batched_ids, anchor_s, anchor_ids = interleaved(
        chunks(prompts, args.batch_size),
        lambda part: [g.token_ids for g in greedy_generate(model, tokenizer, part, config)],
        lambda part: [anchor_greedy(model, tokenizer, p, config) for p in part],
        model.device,
    )
    same = sum(a == b for a, b in zip(batched_ids, anchor_ids, strict=True))
    batched_tokens = sum(len(ids) for ids in batched_ids)
    anchor_tokens = sum(len(ids) for ids in anchor_ids)
    return {
        "prompts": len(prompts),
        "max_new_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "anchor_tokens": anchor_tokens,
        "batched_tokens": batched_tokens,
        "anchor_tokens_per_s": anchor_tokens / anchor_s,
        "batched_tokens_per_s": batched_tokens / batched_s,
        "speedup": (batched_tokens / batched_s) / (anchor_tokens / anchor_s),
        "same_sequences": f"{same}/{len(prompts)}",
    }


# -------------------------------------------------------------------------- command


def load_bundled(dtype: str, device: str) -> tuple[Any, Any]:
    import transformers

    from zo.models import bundled_model_dir

    path = bundled_model_dir()
    transformers.logging.disable_progress_bar()  # a bar in the benchmark's output is noise
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), use_safetensors=True, local_files_only=True
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out
    return model.to(device).eval(), tokenizer


def scoring_table(rows: list[dict]) -> str:
    with_uncached = all("uncached_examples_per_s" in r for r in rows)
    extra = " no-cache ex/s | no-cache speedup |" if with_uncached else ""
    lines = [
        f"| task | examples (distinct, pairs) | anchors ex/s |{extra} batched ex/s | speedup "
        f"|{' cache gain |' if with_uncached else ''} same predictions | max abs score diff |",
        "|---|---|---|---|---|---|---|" + ("---|---|---|" if with_uncached else ""),
    ]
    for r in rows:
        uncached = (
            f" {r['uncached_examples_per_s']:.2f} | {r['uncached_speedup']:.1f}x |"
            if with_uncached
            else ""
        )
        gain = f" {r['cache_gain']:.2f}x |" if with_uncached else ""
        lines.append(
            f"| {r['task']} | {r['examples']} ({r['distinct_examples']}, {r['candidate_pairs']}) "
            f"| {r['anchor_examples_per_s']:.2f} |{uncached} {r['batched_examples_per_s']:.2f} "
            f"| {r['speedup']:.1f}x |{gain} {r['same_predictions']} "
            f"| {r['max_abs_score_difference']:.1e} |"
        )
    return "\n".join(lines)


def generation_table(r: dict) -> str:
    return (
        "| generation | prompts x max new tokens | anchors tok/s | batched tok/s | speedup "
        "| same sequences |\n|---|---|---|---|---|---|\n"
        f"| greedy, batch {r['batch_size']} | {r['prompts']} x {r['max_new_tokens']} "
        f"| {r['anchor_tokens_per_s']:.1f} | {r['batched_tokens_per_s']:.1f} "
        f"| {r['speedup']:.1f}x | {r['same_sequences']} |"
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks",
        default="sentiment,sentiment-5way,copa,record",
        help=f"comma-separated: {', '.join(BENCH_TASKS)} or any registered task",
    )
    parser.add_argument(
        "--fixtures",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="suite tasks read the project's fixture rows (no dataset download)",
    )
    parser.add_argument(
        "--splits", default="dev,test,train", help="splits examples are pooled from, in order"
    )
    parser.add_argument("--examples", type=int, default=32, help="examples per task (at most)")
    parser.add_argument("--prompts", type=int, default=8, help="generation prompts")
    parser.add_argument("--new-tokens", type=int, default=16, help="generation: max new tokens")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="examples (prompts) per batched call"
    )
    parser.add_argument(
        "--max-length", type=int, default=256, help="tokens per sequence, longer ones cut"
    )
    parser.add_argument(
        "--prefix-cache",
        choices=list(PREFIX_CACHE_MODES),
        default="auto",
        help="scoring: run each shared prompt once and reuse its KV cache (tasks.prefix_cache)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="the model's dtype",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="scoring: repeat the interleaved ways this often, report median times",
    )
    record_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from zo.commands.bench import device_name

    names = [name for name in args.tasks.split(",") if name]
    splits = [split for split in args.splits.split(",") if split]
    benchmark_tasks = [build_task(name, args.fixtures) for name in names]  # fail before loading
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_bundled(args.dtype, args.device)
    scoring = []
    with torch.inference_mode():
        for name, task in zip(names, benchmark_tasks, strict=True):
            examples, distinct = bench_examples(task, splits, args.examples)
            print(f"scoring {name}: {len(examples)} examples ...", file=sys.stderr, flush=True)
            result = bench_scoring(model, tokenizer, task, examples, args)
            scoring.append({**result, "task": name, "distinct_examples": distinct})
        texts = [e.fields["text"] for e in tasks.get_task("sentiment").load("dev")]
        prompts = [GENERATION_TEMPLATE.format(text=t) for t in texts[: args.prompts]]
        print(f"generation: {len(prompts)} prompts ...", file=sys.stderr, flush=True)
        generation = bench_generation(model, tokenizer, prompts, args)
    setup = (
        f"SmolLM2-135M-Instruct (bundled), {args.dtype}, {device_name(args.device)}, "
        f"batch size {args.batch_size}"
    )
    text = f"{setup}\n\n{scoring_table(scoring)}\n\n{generation_table(generation)}"
    print(json.dumps({"scoring": scoring, "generation": generation}))
    print(text)
    if args.record:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as handle:
            handle.write(f"\n### bench eval ({stamp})\n\n`zo {' '.join(args.argv)}`\n\n{text}\n")
    return 0
