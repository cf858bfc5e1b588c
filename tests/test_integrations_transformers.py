"""ZOTrainer (zo.integrations.transformers) against references: the same estimator driven by
hand, an uninterrupted run, the estimator's own loss."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments, get_scheduler
from transformers.data.data_collator import default_data_collator

import estimators
from tests.tiny import fresh_tiny
from zo.integrations.transformers import ZOTrainer

STEPS = 4


def tokenized_dataset(tokenizer, rows: int = 16) -> Dataset:
    """Causal-LM rows in HF ``datasets`` form: padded ids, mask, labels (-100 on padding)."""
    texts = [f"row {i}: " + "abcdefgh"[: 1 + i % 8] for i in range(rows)]
    encoded = tokenizer(texts, padding="max_length", max_length=16)
    labels = [
        [token if keep else -100 for token, keep in zip(ids, mask, strict=True)]
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    return Dataset.from_dict({**encoded, "labels": labels})


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
        "max_steps": STEPS,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "max_grad_norm": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 7,
        **overrides,
    }
    return TrainingArguments(**settings)


def trainer(tmp_path, estimator="zo_sgd", config=None, model=None, **overrides) -> ZOTrainer:
    if model is None:
        model, _ = fresh_tiny("llama")
    _, tokenizer = fresh_tiny("llama")
    return ZOTrainer(
        model,
        arguments(tmp_path, **overrides),
        estimator=estimator,
        estimator_config=config,
        train_dataset=tokenized_dataset(tokenizer),
    )


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name


def by_hand(estimator, config, micro_batches, settings, **groups_of) -> tuple:
    """The registered estimator driven by hand: per step, ``estimate`` on each micro-batch
    (rows in dataset order) then ``step``, the lr from transformers' own scheduler."""
    model, tokenizer = fresh_tiny("llama")
    model.eval()
    rows = tokenized_dataset(tokenizer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = groups_of.get("decay")
    params = (
        named
        if decay is None
        else [
            {"params": [(n, p) for n, p in named if n in decay]},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
    )
    optimizer = estimators.build_estimator(estimator, params, config, model=model, seed=7)
    schedule = get_scheduler(
        settings["lr_scheduler_type"],
        optimizer,
        num_warmup_steps=settings["warmup_steps"],
        num_training_steps=STEPS,
    )
    losses, size = [], 2
    for step in range(STEPS):
        for micro in range(micro_batches):
            start = (step * micro_batches + micro) * size
            batch = default_data_collator([rows[i] for i in range(start, start + size)])
            optimizer.estimate(lambda batch=batch: model(**batch).loss)
        losses.append(optimizer.step())
        schedule.step()
    return model, losses


def test_zo_sgd_equals_the_estimator_by_hand(tmp_path):
    """Accumulation, a warmup + linear schedule and weight decay groups, bit for bit; the
    micro-batches of a step share their seeds; the logged loss is the estimator's."""
    settings = {"lr_scheduler_type": "linear", "warmup_steps": 1}
    config = estimators.ZOSGDConfig(lr=1e-3, eps=1e-2, weight_decay=0.1)
    run = trainer(
        tmp_path,
        config={"eps": 1e-2},
        gradient_accumulation_steps=2,
        weight_decay=0.1,
        train_sampling_strategy="sequential",
        **settings,
    )
    run.create_optimizer()
    seeds = []
    estimate = run.estimator.estimate

    def recording(closure):
        result = estimate(closure)
        seeds.append((result.step, tuple(result.seeds)))
        return result

    run.estimator.estimate = recording
    run.train()

    decay = set(run.get_decay_parameter_names(run.model))
    assert decay and decay != {n for n, _ in run.model.named_parameters()}  # two real groups
    reference, losses = by_hand("zo_sgd", config, 2, settings, decay=decay)
    assert_same_weights(run.model, reference)
    assert [s for s, _ in seeds] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(seeds[2 * k][1] == seeds[2 * k + 1][1] for k in range(STEPS))
    assert len({s for _, s in seeds}) == STEPS
    logged = [entry["loss"] for entry in run.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, rel=1e-6)
    assert "grad_norm" not in run.state.log_history[0]


def test_training_never_populates_a_gradient_and_evaluates(tmp_path):
    """Every training forward runs without autograd, no ``.grad`` appears, and the
    Trainer's evaluation gives the model's own mean loss on the eval rows."""
    model, tokenizer = fresh_tiny("llama")
    grad_modes = []
    model.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    for p in model.parameters():
        p.register_hook(lambda g: pytest.fail("a gradient was computed"))
    eval_rows = tokenized_dataset(tokenizer, rows=4)
    run = ZOTrainer(
        model,
        arguments(
            tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2
        ),
        estimator="zo_sgd",
        estimator_config={"eps": 1e-2},
        train_dataset=tokenized_dataset(tokenizer),
        eval_dataset=eval_rows,
    )
    run.train()
    assert grad_modes and not any(grad_modes)
    assert all(p.grad is None for p in model.parameters())
    evaluations = [e["eval_loss"] for e in run.state.log_history if "eval_loss" in e]
    assert len(evaluations) == 2 and evaluations[0] != evaluations[1]
    with torch.no_grad():
        expected = sum(
            float(model(**default_data_collator([eval_rows[i], eval_rows[i + 1]])).loss)
            for i in (0, 2)
        )
    assert run.evaluate()["eval_loss"] == pytest.approx(expected / 2, rel=1e-6)


@pytest.mark.parametrize("estimator", ["zo_sgd", "zo_adam"])
def test_resume_equals_uninterrupted(tmp_path, estimator):
    """Killed after step 2 and resumed from its checkpoint (HF's shuffled order, linear
    schedule, accumulation), a run ends bit-identical to the uninterrupted one."""
    settings = {
        "config": {"eps": 1e-2},
        "gradient_accumulation_steps": 2,
        "lr_scheduler_type": "linear",
        "save_strategy": "steps",
        "save_steps": 2,
    }
    whole = trainer(tmp_path / "whole", estimator, **settings)
    whole.train()
    resumed = trainer(tmp_path / "resumed", estimator, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed.estimator.step_count == STEPS
    assert_same_weights(resumed.model, whole.model)


def test_resume_without_the_estimator_state_is_refused(tmp_path):
    trainer(
        tmp_path / "a", max_steps=1, save_strategy="steps", save_steps=1, save_only_model=True
    ).train()
    again = trainer(tmp_path / "b", max_steps=2)
    with pytest.raises(FileNotFoundError, match="optimizer.pt.*save_only_model"):
        again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))


@pytest.mark.parametrize(("estimator", "micro_batches"), [("sgd", 2), ("lomo", 1)])
def test_first_order_estimators_run_through_the_same_trainer(tmp_path, estimator, micro_batches):
    """First-order estimators call backward inside their own ``estimate``; the trainer's
    result equals the estimator driven by hand, bit for bit. The Trainer's clipping is not
    applied (warned): at 1e-3 it would change every step."""
    settings = {"lr_scheduler_type": "constant", "warmup_steps": 0}
    config = estimators.get_estimator(estimator).config_class(lr=1e-2)
    with pytest.warns(UserWarning, match="max_grad_norm=0.001"):
        run = trainer(
            tmp_path,
            estimator,
            learning_rate=1e-2,
            max_grad_norm=1e-3,
            gradient_accumulation_steps=micro_batches,
            train_sampling_strategy="sequential",
            **settings,
        )
    run.train()
    reference, losses = by_hand(estimator, config, micro_batches, settings)
    assert_same_weights(run.model, reference)
    logged = [entry["loss"] for entry in run.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, rel=1e-6)


COVERED_ABOVE = {"zo_sgd", "zo_adam", "sgd", "lomo"}


@pytest.mark.parametrize(
    "estimator", sorted(set(estimators.available_estimators()) - COVERED_ABOVE)
)
def test_every_other_registered_estimator_trains(tmp_path, estimator):
    """One accumulated step with weight decay groups; ZO estimators leave no gradient."""
    config = {"first_order": ["model.norm.*"]} if estimator == "hybrid" else None
    run = trainer(
        tmp_path, estimator, config, max_steps=1, gradient_accumulation_steps=2, weight_decay=0.01
    )
    before = [p.clone() for p in run.model.parameters()]
    run.train()
    assert run.estimator.step_count == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))
    if estimators.get_estimator(estimator).traits.zeroth_order:
        assert all(p.grad is None for p in run.model.parameters())


def test_lomo_refuses_accumulation(tmp_path):
    with pytest.raises(ValueError, match="lomo.*cannot accumulate.*gradient_accumulation_steps=1"):
        trainer(tmp_path, "lomo", gradient_accumulation_steps=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bf16": True}, "fp16/bf16.*Load the model in the dtype"),
        ({"optim": "adafactor"}, "optim='adafactor'.*would not be used"),
        ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha is refused"),
    ],
)
def test_arguments_that_cannot_apply_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, **overrides)


def test_skipped_arguments_warn_once(tmp_path):
    with pytest.warns(UserWarning) as caught:
        trainer(tmp_path, max_grad_norm=1.0, activation_checkpointing=True)
    ours = [w for w in caught if "ZOTrainer does not apply" in str(w.message)]
    assert len(ours) == 1
    assert "max_grad_norm=1.0" in str(ours[0].message)
    assert "activation_checkpointing" in str(ours[0].message)
    with pytest.warns(UserWarning, match="clip_grad_norm"):
        trainer(tmp_path, "lomo", max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ZOTrainer does not apply")
        trainer(tmp_path)  # max_grad_norm=0: nothing skipped, nothing said


@pytest.mark.parametrize(
    ("estimator", "config", "error", "message"),
    [
        ("zo_sgd", {"lr": 1e-6}, ValueError, r"estimator_config\['lr'\].*learning_rate"),
        ("zo_sgd", {"weight_decay": 0.1}, ValueError, r"TrainingArguments.weight_decay"),
        ("zo_sgd", {"epsilon": 1e-3}, ValueError, r"\['epsilon'\].*choose from.*'eps'"),
        ("zo_sgd", estimators.ZOSGDConfig(lr=1e-6), ValueError, "lr=1e-06 but.*=0.001"),
        ("zo_sgd", estimators.get_estimator("sgd").config_class(), TypeError, "ZOSGDConfig"),
        ("zo_sdg", None, KeyError, "unknown estimator 'zo_sdg'; choose one of"),
    ],
)
def test_bad_estimator_settings_name_the_fix(tmp_path, estimator, config, error, message):
    with pytest.raises(error, match=message):
        trainer(tmp_path, estimator, config=config)


def test_an_optimizer_passed_in_is_refused(tmp_path):
    model, tokenizer = fresh_tiny("llama")
    with pytest.raises(ValueError, match="builds its optimizer from `estimator=`"):
        ZOTrainer(
            model,
            arguments(tmp_path),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
            train_dataset=tokenized_dataset(tokenizer),
        )


def test_config_instance_with_matching_lr_is_used(tmp_path):
    config = estimators.ZOSGDConfig(lr=1e-3, eps=5e-3, queries=2)
    run = trainer(tmp_path, config=config, max_steps=1)
    run.train()
    assert run.estimator.queries == 2 and run.estimator.param_groups[0]["eps"] == 5e-3


def test_import_zo_does_not_load_transformers():
    code = (
        "import sys, zo, zo.integrations; "
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
