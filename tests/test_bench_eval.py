"""`zo bench eval` compares like with like: its one-at-a-time anchors compute what the
batched scoring and decoding compute (on a tiny model; the benchmark runs the real one)."""

from __future__ import annotations

import argparse

import torch

from tasks.base import Example
from tasks.evaluation import EvalSettings, candidate_scores
from tasks.generation import GreedyConfig, greedy_generate
from tests.test_evaluation import CHOICES, TemplateTask
from tests.tiny import lively
from zo.commands import bench_eval


def test_anchor_scores_equal_batched_scores():
    model, tokenizer = lively("llama")
    task = TemplateTask(kind="multiple_choice")
    with torch.inference_mode():
        batched = candidate_scores(model, tokenizer, task, CHOICES, EvalSettings(batch_size=2))
        anchored = bench_eval.anchor_scores(model, tokenizer, task, CHOICES)
    for a, b in zip(batched, anchored, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_anchor_greedy_equals_batched_greedy():
    model, tokenizer = lively("opt")
    prompts = ["Review: fine\nReply:", "x", "A longer prompt than the others"]
    config = GreedyConfig(max_new_tokens=6, stop=())
    with torch.inference_mode():
        batched = [g.token_ids for g in greedy_generate(model, tokenizer, prompts, config)]
        anchored = [bench_eval.anchor_greedy(model, tokenizer, p, config) for p in prompts]
    assert batched == anchored


def test_interleaved_sums_both_sides_over_all_parts():
    calls = []
    parts = bench_eval.chunks(list(range(5)), 2)
    assert parts == [[0, 1], [2, 3], [4]]
    _, batched, _, anchor = bench_eval.interleaved(
        parts,
        lambda part: calls.append(("b", part)) or [x * 10 for x in part],
        lambda part: calls.append(("a", part)) or [-x for x in part],
        torch.device("cpu"),
    )
    assert batched == [0, 10, 20, 30, 40] and anchor == [0, -1, -2, -3, -4]
    assert [kind for kind, _ in calls] == ["b", "a"] * 3  # alternating, part by part


def test_arguments_and_bench_tasks():
    parser = argparse.ArgumentParser()
    bench_eval.add_arguments(parser)
    options = parser.parse_args(["--tasks", "sentiment-5way", "--record"])
    assert options.record and options.batch_size == 16
    task = bench_eval.build_task(options.tasks)
    example = Example({"text": "Fine."}, label=1, uid="u")
    assert task.candidates(example) == list(bench_eval.FIVE_WAY_VERBALIZER.values())


def test_bench_examples_pool_the_splits_a_task_has_and_cycle():
    task = bench_eval.build_task("sentiment")
    examples, distinct = bench_eval.bench_examples(task, ["test", "dev"], 3)
    assert distinct == 3 and examples == task.load("dev")[:3]  # sentiment has no test split
    few = task.load("dev")[:2]
    task.load = lambda split: list(few)  # a task with two examples, like a fixture split
    examples, distinct = bench_eval.bench_examples(task, ["dev"], 5)
    assert distinct == 2 and examples == [few[0], few[1], few[0], few[1], few[0]]


def test_repeated_rounds_take_the_median_time_and_the_first_results():
    clock = iter([0.0, 5.0, 0.0, 1.0, 0.0, 2.0])  # one way, three rounds: 5 s, 1 s, 2 s
    calls = []

    def way(part):
        calls.append(part)
        return [len(calls)]

    original = bench_eval.time.perf_counter
    bench_eval.time.perf_counter = lambda: next(clock)
    try:
        results = bench_eval.repeated([[0]], {"only": way}, torch.device("cpu"), rounds=3)
    finally:
        bench_eval.time.perf_counter = original
    assert results == {"only": (2.0, [1])} and len(calls) == 3


def test_batched_scoring_with_and_without_the_prefix_cache_agree():
    """The bench's cached, uncached and anchor ways compute the same scores."""
    model, tokenizer = lively("opt")
    task = TemplateTask(kind="multiple_choice")
    options = argparse.Namespace(batch_size=2, max_length=256, prefix_cache="always", rounds=1)
    with torch.inference_mode():
        result = bench_eval.bench_scoring(model, tokenizer, task, CHOICES, options)
    assert result["same_predictions"] == result["same_predictions_as_uncached"] == "3/3"
    assert result["max_abs_score_difference"] < 1e-5
    assert result["max_abs_difference_to_uncached"] < 1e-5
    assert "uncached_examples_per_s" in result and "cache_gain" in result
    table = bench_eval.scoring_table([{**result, "distinct_examples": 3}])
    assert all(line.count("|") == 11 for line in table.splitlines())


def test_repeated_prompts_variant_reads_each_prompt_over():
    task = bench_eval.build_task("record-4x")
    example = task.load("dev")[0]
    assert task.prompt(example) == task.task.prompt(example) * 4
    assert task.candidates(example) == task.task.candidates(example) and task.name == "record"
