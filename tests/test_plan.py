"""``zo plan``: shapes against real models, component sizes against real tensors, the memory
traits read from the registrations, the budget search, the CLI."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import estimators
from zo.commands import plan as command
from zo.engine import CPU_CHUNK, EngineConfig
from zo.memory import EstimatorMemory, PlannedEstimator
from zo.memory import shapes as zs
from zo.memory import step as zp
from zo.memory.search import parse_budget
from zo.models import tiny_model

ROOT = Path(__file__).resolve().parent.parent


def planned(name: str) -> PlannedEstimator:
    return estimators.get_estimator(name).planned()


LLAMA_7B = zs.resolve_shape("llama-2-7b")
LLAMA_7B_NF4 = zp.PlanRequest(
    shape=LLAMA_7B,
    estimator=planned("zo_sgd"),
    trainable="mask:0.001",
    quant="nf4",
    dtype="bf16",
    batch=16,
    seq_len=256,
    device="cuda",
)


def _real_and_planned(model: torch.nn.Module) -> None:
    shape = zs.shape_from_hf_config(model.config.to_dict())
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    layer = next(m for m in model.modules() if type(m).__name__.endswith("Layer"))
    linears = sorted(
        tuple(m.weight.shape) for m in layer.modules() if isinstance(m, torch.nn.Linear)
    )
    assert linears == sorted(shape.layer_matrices())


@pytest.mark.parametrize("family", ["llama", "opt", "mistral", "qwen2", "roberta"])
def test_parameter_count_equals_the_real_model(family):
    model, _ = tiny_model(family)
    _real_and_planned(model)


def _gemma3_config(**changes):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **{
            "hidden_size": 64,
            "head_dim": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "vocab_size": 300,
            **changes,
        }
    )


def test_gemma3_text_and_a_head_dim_other_than_hidden_over_heads():
    """Gemma-3: head_dim 32 with hidden 64 / 4 heads (q is 128 wide), sandwich norms and
    q/k norms; a Llama config with its own head_dim too. Built for real, counted by the
    planner from the config alone."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    gemma = AutoModelForCausalLM.from_config(_gemma3_config())
    _real_and_planned(gemma)
    shape = zs.shape_from_config(gemma.config)
    assert (shape.model_type, shape.head_dim, shape.q_width, shape.kv_width) == (
        "gemma3_text",
        32,
        128,
        64,
    )
    assert shape.activations.hidden_norms == 4  # input, post-attention, pre/post-feedforward
    llama = AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=64,
            head_dim=24,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            num_hidden_layers=2,
            vocab_size=300,
        )
    )
    _real_and_planned(llama)
    plan = zp.plan_memory(
        zp.PlanRequest(shape=zs.shape_from_config(gemma.config), estimator=planned("adamw"))
    )
    assert plan.peak_allocated > 0


def test_activation_counts_are_derived_not_tabled():
    """The counts the planner derives from a block's parts equal those read off the
    modeling code of Llama (10 h, 4 i stored), OPT (8 h, ReLU 1 i) and RoBERTa (GELU 2 i)."""
    llama, opt, roberta = (zs.resolve_shape(n) for n in ("llama-2-7b", "opt-13b", "roberta-large"))
    # stored_h leaves out q, k, v and the attention output (four of the query width)
    assert (llama.activations.stored_h + 4, llama.activations.stored_i) == (10, 4)
    assert (opt.activations.stored_h + 4, opt.activations.stored_i) == (8, 1)
    assert opt.activations.held_embeddings == 2 and not opt.activations.rope
    assert (roberta.activations.stored_i, roberta.activations.held_embeddings) == (2, 1)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("out_features,in_features", [(200, 300), (130, 77)])
def test_nf4_bytes_equal_bitsandbytes_storage(double_quant, out_features, in_features):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out_features, in_features),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=double_quant,
    )
    layer = layer.to("cpu")  # quantizes
    state = layer.weight.quant_state
    stored = [state.absmax, state.code]
    if state.nested:
        stored += [state.state2.absmax, state.state2.code, state.offset]
    packed, state_bytes = zp.nf4_bytes(out_features * in_features, double_quant)
    assert packed == layer.weight.numel() * layer.weight.element_size()
    assert state_bytes == sum(t.numel() * t.element_size() for t in stored)


OPT_125M = zs.resolve_shape("opt-125m")
CPU = zp.PlanRequest(
    shape=OPT_125M,
    estimator=planned("zo_sgd"),
    device="cpu",
    batch=8,
    seq_len=128,
    engine=EngineConfig(threads=1),
)


def peak(**changes) -> int:
    if isinstance(changes.get("estimator"), str):
        changes["estimator"] = planned(changes["estimator"])
    return zp.plan_memory(replace(CPU, **changes)).peak_allocated


def test_peak_grows_with_batch_sequence_and_depth():
    assert peak(batch=4) < peak(batch=8) < peak(batch=16)
    assert peak(seq_len=64) < peak(seq_len=128) < peak(seq_len=256)
    assert peak(shape=replace(OPT_125M, layers=6)) < peak()


def test_estimators_order_by_what_they_keep():
    zo_sgd, zo_adam = peak(estimator="zo_sgd"), peak(estimator="zo_adam")
    lomo, adamw = peak(estimator="lomo"), peak(estimator="adamw")
    assert zo_sgd < zo_adam and zo_sgd < lomo < adamw
    # ZO-Adam's state is two fp32 copies of the trainable set, the rest is ZO-SGD's
    assert zo_adam - zo_sgd == 2 * OPT_125M.parameters() * 4 + 2**20 * 4  # + g_hat's chunk


def test_every_registered_estimator_has_a_memory_trait_the_planner_uses():
    """Adding an estimator needs nothing in the planner: its registration carries it."""
    for name in estimators.available_estimators():
        spec = estimators.get_estimator(name)
        assert isinstance(spec.traits.memory, EstimatorMemory), name
        attention = "eager" if spec.traits.eager_attention else "sdpa"
        plan = zp.plan_memory(replace(CPU, estimator=spec.planned(), attention=attention))
        assert plan.peak_allocated > 0 and plan.request.estimator.name == name
        assert spec.traits.memory.backward == (not spec.traits.zeroth_order), name


def test_the_planner_names_no_estimator():
    """No table keyed by estimator names (nor by name checks) in the planner's sources."""
    names = set(estimators.available_estimators())
    for path in sorted((ROOT / "zo" / "memory").glob("*.py")):
        literals = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert not names & literals, f"{path.name} names {sorted(names & literals)}"


def test_the_planner_keeps_no_table_per_family():
    """No mapping keyed by a model family, and no comparison with a family name."""
    from zo.models import available_families

    families = set(available_families())
    for path in sorted((ROOT / "zo" / "memory").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            keys = node.keys if isinstance(node, ast.Dict) else []
            if isinstance(node, ast.Compare):
                keys = node.comparators
            found = {k.value for k in keys if isinstance(k, ast.Constant)} & families
            assert not found, f"{path.name}:{node.lineno} keys on families {sorted(found)}"


def test_eager_attention_comes_from_the_trait_not_the_name():
    tangent = PlannedEstimator("my_jvp", EstimatorMemory(tangents=True), eager_attention=True)
    with pytest.raises(zs.PlanError, match="my_jvp needs eager attention"):
        zp.plan_memory(replace(CPU, estimator=tangent, attention="sdpa"))
    assert zp.plan_memory(replace(CPU, estimator=tangent, attention="eager")).peak_allocated
    # forward_grad registers the trait; the planner reads it from the registration
    with pytest.raises(zs.PlanError, match="forward_grad needs eager attention"):
        zp.plan_memory(replace(CPU, estimator=planned("forward_grad"), attention="sdpa"))


def test_engine_settings_come_from_the_engine_config():
    # a chunk per thread and an accumulator, for an estimator that rebuilds g_hat by chunks
    momentum = replace(CPU, estimator=planned("zo_sgd_momentum"))
    chunked = zp.plan_memory(replace(momentum, engine=EngineConfig(threads=2, chunk_size=1000)))
    assert chunked.component("direction chunk") == 1000 * 4 * 2 * 2
    default = zp.plan_memory(CPU)
    assert EngineConfig().chunk_size == 0  # by device: the engine's CPU chunk
    # ZO-SGD under philox-ieee (auto on CPU) draws inside its fused passes: OPT-125m's
    # output-side head is the one chunk; torch-blocks draws a chunk per thread
    assert default.component("direction chunk") == CPU_CHUNK * 4
    two = replace(CPU, engine=EngineConfig(threads=2, generator="torch-blocks"))
    assert zp.plan_memory(two).component("direction chunk") == CPU_CHUNK * 4 * 2
    small_head = replace(CPU, engine=EngineConfig(threads=2, offload_threshold=10**12))
    assert zp.plan_memory(small_head).component("direction chunk") == 0
    # OPT-125m's embedding (38.6M elements) is perturbed output-side above the threshold
    never = replace(CPU, engine=EngineConfig(threads=1, offload_threshold=10**12))
    assert zp.plan_memory(never).peak_allocated > default.peak_allocated


def test_lora_means_what_zo_train_means():
    """``lora`` / ``lora:TARGETS`` name target modules (rank: lora_r), as in zo train; the
    trainable count equals peft's adapters on a real model."""
    from zo.trainable import add_lora

    model, _ = tiny_model("llama")
    shape = zs.shape_from_config(model.config)
    for text, targets in (("lora", ["q_proj", "v_proj"]), ("lora:k_proj,down_proj", None)):
        targets = targets or text.removeprefix("lora:").split(",")
        copy, _ = tiny_model("llama")
        adapters = add_lora(copy, r=4, target_modules=targets)
        request = replace(CPU, shape=shape, trainable=text, lora_r=4, seq_len=16)
        assert zp.plan_memory(request).trainable_parameters == sum(p.numel() for _, p in adapters)
    with pytest.raises(zs.PlanError, match="--lora-r 8"):
        zp.parse_trainable("lora:8")
    with pytest.raises(zs.PlanError, match="match no linear layer"):
        zp.plan_memory(replace(CPU, trainable="lora:query"))


def test_names_count_the_parameters_zo_train_selects():
    import fnmatch

    model, _ = tiny_model("llama")
    patterns = ["model.norm.weight", "model.layers.*.mlp.*"]
    selected = sum(
        p.numel()
        for name, p in model.named_parameters()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    )
    request = replace(
        CPU, shape=zs.shape_from_config(model.config), trainable="names:" + ",".join(patterns)
    )
    assert zp.plan_memory(request).trainable_parameters == selected
    with pytest.raises(zs.PlanError, match="match no parameter"):
        zp.plan_memory(replace(request, trainable="names:decoder.*"))


def test_nf4_and_masks_shrink_the_footprint():
    nf4 = LLAMA_7B_NF4
    dense = replace(nf4, quant="none")
    assert zp.plan_memory(nf4).peak_allocated < zp.plan_memory(dense).peak_allocated
    single = zp.plan_memory(replace(nf4, double_quant=False))
    assert zp.plan_memory(nf4).component("quant states") < single.component("quant states")
    denser = zp.plan_memory(replace(nf4, trainable="mask:0.01"))
    assert denser.peak_allocated > zp.plan_memory(nf4).peak_allocated


def test_llama_2_7b_nf4_sparse_zo_fits_in_5_gib():
    plan = zp.plan_memory(LLAMA_7B_NF4)
    assert plan.peak_allocated <= 5 * zp.GIB
    assert plan.process_total <= 5 * zp.GIB  # with the CUDA context
    # 32 layers x (4 x 4096^2 + 3 x 4096 x 11008) weights, two per byte
    assert plan.component("4-bit weights") == 32 * (4 * 4096**2 + 3 * 4096 * 11008) // 2
    assert (
        plan.trainable_parameters
        == round(0.001 * 4096**2) * 4 * 32 + round(0.001 * 4096 * 11008) * 3 * 32
    )


def test_full_logits_cost_sequence_times_vocabulary():
    scored, full = peak(scored=1), peak(logits="full")
    assert full - scored >= 8 * 128 * OPT_125M.vocab * 4 * 2  # at least logits + log-softmax


def test_sparse_delta_scratch_is_bounded_in_forward_and_backward():
    """At 16x256 tokens the gathered inputs of Llama-2-7B's MLP masks (45k entries) would be
    1.7 GiB per call (bf16, fp32 copy, products), and autograd's composite would store two
    fp32 blocks per masked matrix (~13 GiB for the model); the layer works in token chunks
    and its backward re-gathers, so neither shows in the plan."""
    zo_plan = zp.plan_memory(LLAMA_7B_NF4)
    unchunked = 16 * 256 * round(0.001 * 4096 * 11008) * (2 + 4 + 4)
    assert zo_plan.component("activations") < unchunked / 2
    lomo = zp.plan_memory(replace(LLAMA_7B_NF4, estimator=planned("lomo")))
    stored_by_composite = 2 * 16 * 256 * lomo.trainable_parameters * 4
    assert lomo.component("activations") < stored_by_composite / 4


def test_block_zo_is_zo_sgd_plus_the_kept_hidden_states():
    """block_zo keeps the perturbed block's input for the step's later forwards (and hands
    back a copy): two [tokens, hidden] tensors on top of ZO-SGD."""
    zo_sgd = zp.plan_memory(CPU)
    blocks = zp.plan_memory(replace(CPU, estimator=planned("block_zo")))
    kept = 2 * 8 * 128 * OPT_125M.hidden * 4
    assert blocks.component("kept hidden states") == kept
    assert blocks.peak_allocated == zo_sgd.peak_allocated + kept


# ---------------------------------------------------------------------- the command


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def run_json(argv: list[str], capsys) -> dict:
    assert command.run(parse([*argv, "--json"])) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_cli_json_is_the_plan_and_echoes_its_assumptions(capsys):
    argv = "--model llama2-7b --trainable mask:0.001 --quant nf4 --batch 16 --seq 256"
    out = run_json([*argv.split(), "--device", "cuda", "--dtype", "bf16"], capsys)
    assert out["peak_allocated_bytes"] == zp.plan_memory(LLAMA_7B_NF4).peak_allocated
    assert out["components"]["4-bit weights"] > 0
    assert out["assumptions"]["batch"] == {"value": 16, "from": "given"}
    assert zp.PlanRequest(shape=OPT_125M, estimator=planned("zo_sgd")).double_quant
    single = parse([*argv.split(), "--no-double-quant"])
    assert command.request_from_options(single)[0].double_quant is False


def test_cli_uses_zo_train_defaults(capsys):
    from zo.config import RunConfig

    defaults = RunConfig()
    echo = run_json(["--model", "opt-125m", "--device", "cpu"], capsys)["assumptions"]
    assert echo["batch"] == {"value": defaults.train.batch_size, "from": "zo train's default"}
    assert echo["seq_len"]["value"] == defaults.task.max_length
    assert echo["dtype"]["value"] == defaults.model.dtype
    assert echo["estimator"]["value"] == defaults.estimator["name"]
    assert echo["trainable"]["value"] == defaults.trainable.kind


def test_cli_shape_without_a_preset(capsys):
    argv = "--family llama --hidden 256 --layers 4 --intermediate 768 --heads 4 --vocab 4096"
    assert command.run(parse([*argv.split(), "--device", "cpu"])) == 0
    assert "peak, allocator" in capsys.readouterr().out


def test_budget_lists_what_fits_largest_batch_first(capsys):
    budget = 3 * 2**30
    out = run_json(["--model", "smollm2-135m", "--device", "cuda", "--budget", "3GiB"], capsys)
    fits = out["fits"]
    assert fits and all(f["process_total_bytes"] <= budget for f in fits)
    kinds = [f["trainable"].partition(":")[0] for f in fits]
    assert kinds == sorted(kinds, key=["full", "lora", "mask"].index)  # best first
    assert {f["estimator"] for f in fits} >= {"zo_sgd", "adamw", "lomo"}
    # each row is the largest batch that fits: twice that batch does not
    shape = zs.resolve_shape("smollm2-135m")
    for fit in fits:
        if fit["batch"] < 16:
            request = zp.PlanRequest(
                shape=shape,
                estimator=planned(fit["estimator"]),
                trainable=fit["trainable"],
                quant=fit["quant"],
                batch=2 * fit["batch"],
                seq_len=fit["seq_len"],
                attention=fit["attention"],
                gradient_checkpointing=fit["gradient_checkpointing"],
                device="cuda",
            )
            assert zp.plan_memory(request).process_total > budget, fit


def test_budget_keeps_what_is_given_and_reads_a_config(tmp_path, capsys):
    out = run_json(
        ["--model", "opt-125m", "--device", "cpu", "--budget", "4G", "--estimator", "lomo"],
        capsys,
    )
    assert {f["estimator"] for f in out["fits"]} == {"lomo"}
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny-llama", "device": "cpu"},
                "task": {"name": "sentiment", "max_length": 64},
                "trainable": "lora",
                "estimator": "adamw",
                "train": {"batch_size": 4},
            }
        )
    )
    out = run_json(["--config", str(config), "--budget", "2GiB"], capsys)
    assert [(f["estimator"], f["trainable"], f["batch"]) for f in out["fits"]][0] == (
        "adamw",
        "lora:q_proj,v_proj",
        4,
    )
    assert out["assumptions"]["estimator"]["from"] == f"config {config}"


def test_models_as_zo_train_takes_them(tmp_path, capsys, monkeypatch):
    """A local checkpoint directory, a cached hub id (never downloaded), a Gemma-3 config."""
    model, _ = tiny_model("opt")
    model.save_pretrained(tmp_path / "opt")
    out = run_json(["--model", str(tmp_path / "opt"), "--device", "cpu"], capsys)
    assert out["parameters"] == sum(p.numel() for p in model.parameters())

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--gemma" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--org--gemma" / "refs").mkdir()
    (cache / "models--org--gemma" / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text(_gemma3_config().to_json_string())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = run_json(["--model", "org/gemma", "--device", "cpu"], capsys)
    assert out["assumptions"]["model_type"]["value"] == "gemma3_text"
    assert command.run(parse(["--model", "org/absent", "--device", "cpu"])) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "gpt-17"], "unknown model"),
        (["--model", "opt-125m", "--trainable", "mask:2"], "trainable"),
        (["--model", "opt-125m", "--trainable", "lora:8"], "--lora-r 8"),
        (["--model", "opt-125m", "--quant", "nf4"], "4-bit base is frozen"),
        (["--model", "opt-125m", "--estimator", "block_zoo"], "estimator"),
        (["--model", "opt-125m", "--batch", "0"], "batch"),
        (["--family", "llama", "--hidden", "256"], "missing --layers"),
        (["--model", "opt-125m", "--budget", "8 gigs"], "not a size"),
        (["--model", "opt-125m", "--budget", "1MiB"], "nothing fits in"),
        (["--config", "absent.yaml"], "absent.yaml"),
    ],
)
def test_bad_requests_exit_2_with_a_message(argv, message, capsys):
    assert command.run(parse([*argv, "--device", "cpu"])) == 2
    assert message in capsys.readouterr().err


def test_budget_units():
    assert parse_budget("8GiB") == parse_budget("8G") == 8 * 2**30
    assert parse_budget("80GB") == 80 * 10**9
    assert parse_budget("512 MiB") == 512 * 2**20
    assert parse_budget("1.5TiB") == int(1.5 * 2**40)


def _plan_check():
    path = ROOT / "experiments" / "plan_check.py"
    spec = importlib.util.spec_from_file_location("plan_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("plan_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("family, estimator", [("llama", "zo_sgd"), ("opt", "adamw")])
def test_prediction_within_15_percent_of_measured_peak(family, estimator):
    check = _plan_check()
    row = check.compare(check.Case(family, "tiny", estimator, "cpu"))
    assert abs(row["total_ratio"] - 1) <= 0.15
    assert abs(row["step_ratio"] - 1) <= 0.15
