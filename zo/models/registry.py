"""Model families and model names, on :mod:`zo.registry`.

A family (llama, opt, ...) registers its Hugging Face config and model classes (or their
names in ``transformers``, looked up when first needed: importing four modeling modules up
front would add seconds to ``zo list``) and its traits. Every family ``F`` also names a tiny
random model, ``tiny-F``; other names (the bundled model) register a loader.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import transformers

from zo.registry import Registration, Registry

if TYPE_CHECKING:
    import torch
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

    from zo.models.tiny import TinySpec

__all__ = [
    "FAMILIES",
    "MODELS",
    "TINY_PREFIX",
    "FamilyTraits",
    "Loader",
    "ModelFamily",
    "ModelNotFoundError",
    "ModelTraits",
    "UnknownFamilyError",
    "UnsupportedModelError",
    "architecture_for",
    "available_families",
    "available_models",
    "family_config_class",
    "family_model_class",
    "family_of",
    "get_family",
    "get_model",
    "is_registered_model",
    "register_family",
    "register_model",
    "tiny_family_of",
]


class ModelNotFoundError(ValueError):
    """A model name that is not registered, not a local checkpoint directory, and not a hub
    id that can be fetched (offline, gated, no such repo); the CLI exits with code 2."""


class UnsupportedModelError(ModelNotFoundError):
    """A checkpoint whose ``model_type`` neither zo's families nor transformers can load."""


class UnknownFamilyError(ValueError):
    """A family name that is not registered; the message lists the registered ones."""


# --- families ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyTraits:
    """What other modules need to know about a family."""

    model_types: tuple[str, ...]
    """``config.model_type`` values of real checkpoints of this family."""
    tiny_config: Callable[[TinySpec], dict[str, Any]]
    """The keyword arguments of the family's config class for a tiny random model."""
    tokenizer: Callable[[], PreTrainedTokenizerFast]
    """The offline tokenizer of tiny models (a masked LM needs one with a mask token)."""
    default_attn: str
    """The attention implementation real checkpoints load with when none is asked for."""
    ties_embeddings: bool
    """Whether tiny models (and the family's small real models) tie ``lm_head`` to the input
    embedding."""


ClassRef: TypeAlias = "str | type"
"""A class of ``transformers``, or its name there (resolved when first needed)."""

ModelFamily: TypeAlias = Registration[Any, ClassRef, FamilyTraits]
"""A family's registration: ``config_class`` and ``impl`` (the model class) as registered."""

_FAMILIES: Registry[Any, ClassRef, FamilyTraits] = Registry(
    "model family", FamilyTraits, UnknownFamilyError
)
FAMILIES: Mapping[str, ModelFamily] = _FAMILIES.as_mapping()
"""Read-only ``name -> family`` view of the registered families."""

TINY_PREFIX = "tiny-"


def register_family(name: str, config_class: ClassRef, impl: ClassRef, **traits: Any) -> ClassRef:
    """Add a family (traits: :class:`FamilyTraits`); its tiny model is ``tiny-<name>``.

    ``config_class`` is the Hugging Face config class, ``impl`` the model class that loads the
    family's checkpoints; either may be its name in ``transformers``.
    """
    if TINY_PREFIX + name in _MODELS:
        raise ValueError(f"model {TINY_PREFIX + name!r} is already registered")
    return _FAMILIES.register(name, config_class, impl, **traits)


def get_family(name: str) -> ModelFamily:
    return _FAMILIES.get(name)


def available_families() -> list[str]:
    return _FAMILIES.names()


def family_of(model_type: str) -> ModelFamily | None:
    """The registered family whose real checkpoints have this ``config.model_type``."""
    return next((f for f in _FAMILIES if model_type in f.traits.model_types), None)


def _resolve(ref: ClassRef) -> type:
    return getattr(transformers, ref) if isinstance(ref, str) else ref


def family_model_class(family: ModelFamily) -> type[PreTrainedModel]:
    return _resolve(family.impl)


def family_config_class(family: ModelFamily) -> type[PretrainedConfig]:
    return _resolve(family.config_class)


# --- model names ------------------------------------------------------------------------------

Loader = Callable[["torch.dtype", "str | None"], "tuple[PreTrainedModel, PreTrainedTokenizerBase]"]
"""Builds a registered model: ``(dtype, attn or None for the default) -> (model, tokenizer)``."""


@dataclass(frozen=True)
class ModelTraits:
    directory: Callable[[], Path] | None
    """Where the model's checkpoint is on disk (made on first use), or None for a model built
    in memory (loaders that need files get it saved to a temporary directory)."""


_MODELS: Registry[Any, Loader, ModelTraits] = Registry("model", ModelTraits, ModelNotFoundError)
MODELS: Mapping[str, Registration[Any, Loader, ModelTraits]] = _MODELS.as_mapping()
"""Read-only ``name -> registration`` view of the registered model names (``tiny-<family>``
names follow the families and are not in it)."""


def register_model(name: str, config_class: ClassRef, impl: Loader, **traits: Any) -> Loader:
    """Make ``name`` loadable by ``load_model`` (traits: :class:`ModelTraits`).

    ``config_class`` is the model's Hugging Face config class (or its name), ``impl`` loads it.
    """
    if tiny_family_of(name) is not None:
        raise ValueError(f"model {name!r} is already registered (the tiny model of a family)")
    return _MODELS.register(name, config_class, impl, **traits)


def get_model(name: str) -> Registration[Any, Loader, ModelTraits]:
    """A registered (not ``tiny-<family>``) model name's registration."""
    return _MODELS.get(name)


def tiny_family_of(name: str) -> str | None:
    """``F`` for ``tiny-F`` when ``F`` is a registered family, else None."""
    family = name.removeprefix(TINY_PREFIX)
    return family if name.startswith(TINY_PREFIX) and family in _FAMILIES else None


def is_registered_model(name: str) -> bool:
    return name in _MODELS or tiny_family_of(name) is not None


def available_models() -> list[str]:
    """The registered model names, ``tiny-<family>`` included, sorted."""
    return sorted([*_MODELS.names(), *(TINY_PREFIX + name for name in _FAMILIES.names())])


# --- which class loads a checkpoint -----------------------------------------------------------


def architecture_for(
    path: Path, trust_remote_code: bool = False, source: str | None = None
) -> type[PreTrainedModel]:
    """The class that loads the checkpoint in ``path``: its family's (so RoBERTa loads as the
    masked LM that MeZO's prompts need), else transformers' causal LM for its model_type.

    Raises :class:`UnsupportedModelError` for a type neither knows; ``source`` names the
    checkpoint in that message (default: ``path``).
    """
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type", "")
    family = family_of(model_type)
    if family is not None:
        return family_model_class(family)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    has_own_code = "AutoModelForCausalLM" in (config.get("auto_map") or {})
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (has_own_code and trust_remote_code):
        return transformers.AutoModelForCausalLM
    supported = {f.name: list(f.traits.model_types) for f in _FAMILIES}
    fix = (
        "it ships its own modeling code: if you trust it, load it from Python with "
        "zo.models.load_model(..., trust_remote_code=True)"
        if has_own_code
        else "use a checkpoint of a supported family, or a transformers version that knows it"
    )
    raise UnsupportedModelError(
        f"{source or path} has model_type {model_type!r}, which is not a family of zo "
        f"(model types {supported}) nor a causal LM of transformers {transformers.__version__}; "
        f"{fix}"
    )
