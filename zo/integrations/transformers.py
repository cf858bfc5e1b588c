"""``ZOTrainer``: a registered estimator in place of backward + optimizer in ``transformers.Trainer``.

The Trainer keeps what it does well (data loading, the lr schedule, logging, evaluation,
checkpoints and resume); the estimator replaces backward and the optimizer:

* ``training_step`` calls ``estimator.estimate(closure)`` on each micro-batch, the closure
  being the Trainer's own ``compute_loss`` on that batch. It never calls ``backward()``
  (first-order estimators call it inside their own ``estimate``).
* The Trainer's ``optimizer.step()`` (through accelerate's wrapper) is the estimator's
  ``step()``: it applies every estimate since the last step, so with
  ``gradient_accumulation_steps=k`` a ZO step averages k projected gradients of the same
  seeds. Each micro-batch's loss is its own mean (``num_items_in_batch`` is not passed on):
  the estimator averages micro-batches, as ``zo train`` does.
* The estimator *is* the optimizer the Trainer schedules: ``learning_rate`` and
  ``weight_decay`` come from ``TrainingArguments`` (decay skips biases and norms, as the
  Trainer's own optimizers do), the lr scheduler sets each param group's ``lr`` before
  the step reads it, and checkpoints store ``estimator.state_dict()`` as ``optimizer.pt``,
  so a resumed run continues the same seeds.
* The model runs in eval mode while training (dropout off): the two forwards of a finite
  difference must compute the same function, and ``zo train`` does the same.

Settings that cannot apply are refused (mixed precision, several processes, NEFTune, an
``optim`` choice, an optimizer passed in) or warned about once at construction
(``max_grad_norm``, ``activation_checkpointing``); none is silently dropped.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.training_args import OptimizerNames

import estimators
from estimators import Estimator, EstimatorSpec
from zo.engine import EngineConfig

TRAINER_SETTINGS = {"lr": "learning_rate", "weight_decay": "weight_decay"}
"""Estimator config fields that ``TrainingArguments`` owns (config field -> argument)."""


class ZOTrainer(Trainer):
    """``transformers.Trainer`` whose training step is a registered estimator's.

    ``estimator`` names the estimator (``estimators.available_estimators()``);
    ``estimator_config`` is its config dataclass or a dict of that dataclass's fields,
    without ``lr`` and ``weight_decay`` (``TrainingArguments.learning_rate`` and
    ``weight_decay`` set them); ``engine`` the perturbation engine's config. The
    estimator's seed is ``TrainingArguments.seed``. Every other argument is the Trainer's.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *,
        estimator: str = "zo_sgd",
        estimator_config: Any = None,
        engine: EngineConfig | None = None,
        **trainer_kwargs: Any,
    ):
        self.estimator_spec: EstimatorSpec = estimators.get_estimator(estimator)
        optimizers = trainer_kwargs.get("optimizers", (None, None))
        if any(part is not None for part in optimizers) or trainer_kwargs.get(
            "optimizer_cls_and_kwargs"
        ):
            raise ValueError(
                "ZOTrainer builds its optimizer from `estimator=`: pass no `optimizers` or "
                "`optimizer_cls_and_kwargs` (choose the schedule with "
                "TrainingArguments.lr_scheduler_type)"
            )
        super().__init__(model, args, **trainer_kwargs)
        self.engine = engine
        self.estimator: Estimator | None = None
        """The estimator, once built (``self.optimizer`` is accelerate's wrapper of it)."""
        _check_arguments(self.args, self.estimator_spec)
        self.estimator_config = resolve_config(self.estimator_spec, estimator_config, self.args)
        if self.estimator_spec.traits.eager_attention:
            attn = self.model.config._attn_implementation
            if attn != "eager":
                raise ValueError(
                    f"estimator {estimator!r} differentiates forward-mode through the model, "
                    f"which needs eager attention (the model uses {attn!r}): load it with "
                    "attn_implementation='eager'"
                )

    # ------------------------------------------------------------------ the optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = model if model is not None else self.model
            self.estimator = estimators.build_estimator(
                self.estimator_spec.name,
                self._param_groups(model),
                self.estimator_config,
                model=model,
                seed=self.args.seed,
                engine=self.engine,
            )
            self.optimizer = self.estimator
        return self.optimizer

    def _param_groups(self, model: nn.Module) -> list[Any]:
        """The trainable tensors, named, in model order; with weight decay, the Trainer's
        split into a decayed group and a group of biases and norms without decay."""
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
        if self.args.weight_decay == 0:
            return named
        decay = set(self.get_decay_parameter_names(model))
        groups = [
            {"params": [(name, p) for name, p in named if name in decay]},
            {"params": [(name, p) for name, p in named if name not in decay], "weight_decay": 0.0},
        ]
        return [group for group in groups if group["params"]]

    # ------------------------------------------------------------------ the step
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One ``estimate`` on this micro-batch; returns its loss over the accumulation steps
        (the Trainer sums these into the logged loss)."""
        del num_items_in_batch  # each micro-batch's loss is its own mean: see the module doc
        model.eval()
        inputs = self._prepare_inputs(inputs)

        def closure() -> torch.Tensor:
            # compute_loss may pop "labels" (label smoothing): every call gets its own dict
            with self.compute_loss_context_manager():
                return self.compute_loss(model, dict(inputs))

        loss = self.estimator.estimate(closure).loss
        return torch.tensor(
            loss / self.current_gradient_accumulation_steps, device=self.args.device
        )

    def _clip_grad_norm(self, model: nn.Module) -> None:
        """Not applied (warned at construction): ZO has no gradient; first-order
        estimators hold unaveraged or already-freed gradients when the Trainer clips."""
        return None

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> None:
        """No ``grad_norm`` in the logs: there is no gradient to measure (it would read 0)."""
        return None

    # ------------------------------------------------------------------ checkpoints
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Resume the estimator's state (step count, hence seeds; moments), or refuse."""
        if checkpoint is None:
            return
        missing = [
            name
            for name in (OPTIMIZER_NAME, SCHEDULER_NAME)
            if not os.path.isfile(os.path.join(checkpoint, name))
        ]
        if missing:
            raise FileNotFoundError(
                f"{checkpoint} has no {' or '.join(missing)} (saved with save_only_model=True?): "
                "without the estimator's state a resumed run would restart its seeds and lr "
                "schedule at step 0. Resume from a checkpoint saved with the optimizer, or "
                "start a new run from these weights"
            )
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.estimator.step_count != self.state.global_step:
            raise ValueError(
                f"{checkpoint}: the estimator state is at step {self.estimator.step_count} but "
                f"the trainer state at step {self.state.global_step}; the files do not belong "
                "together"
            )


def resolve_config(spec: EstimatorSpec, given: Any, args: TrainingArguments) -> Any:
    """The estimator's config dataclass: ``given`` (an instance or a dict of its fields,
    or None for defaults) with ``lr`` and ``weight_decay`` from ``args``."""
    config_class = spec.config_class
    names = {f.name for f in dataclasses.fields(config_class)}
    owned = {
        field: getattr(args, argument)
        for field, argument in TRAINER_SETTINGS.items()
        if field in names
    }
    if "weight_decay" not in names and args.weight_decay != 0:
        raise ValueError(
            f"estimator {spec.name!r} has no weight decay; set TrainingArguments.weight_decay=0"
        )
    if given is None:
        given = {}
    if isinstance(given, Mapping):
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(
                f"estimator_config: {unknown} are not fields of {config_class.__name__} "
                f"(estimator {spec.name!r}); choose from {sorted(names - set(owned))}"
            )
        clashes = sorted(set(given) & set(owned))
        if clashes:
            argument = TRAINER_SETTINGS[clashes[0]]
            raise ValueError(
                f"estimator_config[{clashes[0]!r}]: ZOTrainer takes it from "
                f"TrainingArguments.{argument} (the Trainer's scheduler drives it); set "
                f"{argument}=... there"
            )
        return config_class(**given, **owned)
    if isinstance(given, config_class):
        for field, value in owned.items():
            if getattr(given, field) != value:
                raise ValueError(
                    f"estimator_config.{field}={getattr(given, field)} but "
                    f"TrainingArguments.{TRAINER_SETTINGS[field]}={value}: ZOTrainer takes it "
                    f"from TrainingArguments (the Trainer's scheduler drives it); make them "
                    "equal, or pass the other fields as a dict"
                )
        return given
    raise TypeError(
        f"estimator_config for {spec.name!r} must be a {config_class.__name__} or a dict of "
        f"its fields, got {type(given).__name__}"
    )


def _check_arguments(args: TrainingArguments, spec: EstimatorSpec) -> None:
    """Refuse the Trainer settings that cannot apply; warn once about those it skips."""
    if args.fp16 or args.bf16:
        raise ValueError(
            "TrainingArguments fp16/bf16 (autocast mixed precision) is refused by ZOTrainer: "
            "the two forwards of a finite difference would differ by autocast rounding, and "
            "fp16's gradient scaler needs gradients the estimators never hand it. Load the "
            "model in the dtype to train in (from_pretrained(..., dtype=torch.bfloat16)): "
            "the estimators perturb and update it exactly"
        )
    if args.world_size > 1 or args.n_gpu > 1:
        raise ValueError(
            f"ZOTrainer runs in one process on one device (world_size={args.world_size}, "
            f"n_gpu={args.n_gpu}): it does not average estimates over ranks. Show it one GPU "
            "(CUDA_VISIBLE_DEVICES), or train data-parallel with `zo train` under torchrun"
        )
    if args.neftune_noise_alpha is not None:
        raise ValueError(
            "neftune_noise_alpha is refused by ZOTrainer: NEFTune adds noise in training mode, "
            "and ZOTrainer runs the model in eval mode (both forwards of a finite difference "
            "must compute the same function)"
        )
    optim = OptimizerNames(args.optim).value
    if optim != TrainingArguments.__dataclass_fields__["optim"].default or args.optim_args:
        raise ValueError(
            f"TrainingArguments.optim={optim!r} / optim_args would not be used: the "
            f"estimator (estimator={spec.name!r}, its settings in estimator_config) is the "
            "optimizer; leave optim and optim_args at their defaults"
        )
    if not spec.traits.grad_accum and args.gradient_accumulation_steps > 1:
        raise ValueError(
            f"estimator {spec.name!r} cannot accumulate micro-batches (it updates inside "
            f"backward): set gradient_accumulation_steps=1 (not {args.gradient_accumulation_steps}) "
            "and raise per_device_train_batch_size instead"
        )
    skipped = []
    if args.max_grad_norm and args.max_grad_norm > 0:
        hint = (
            "set estimator_config={'clip_grad_norm': ...} for LOMO's own clipping"
            if "clip_grad_norm" in {f.name for f in dataclasses.fields(spec.config_class)}
            else "zeroth-order estimators have no gradient to clip"
        )
        skipped.append(f"max_grad_norm={args.max_grad_norm} ({hint}; set max_grad_norm=0)")
    if args.gradient_checkpointing:
        skipped.append(
            "activation_checkpointing (the model trains in eval mode, where transformers does "
            "not checkpoint; ZO keeps no activations to save)"
        )
    if skipped:
        warnings.warn(
            "ZOTrainer does not apply: " + "; ".join(skipped),
            UserWarning,
            stacklevel=3,
        )
