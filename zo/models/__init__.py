"""Models: the family registry, tiny random models, loading by name, the bundled model.

- :mod:`zo.models.registry` -- families and model names (``register_family``, ``family_of``)
- :mod:`zo.models.tiny` -- byte tokenizers, tiny configs per family, ``tiny_model``
- :mod:`zo.models.loading` -- ``load_model``, checkpoint directories, tokenizers, dtypes
- :mod:`zo.models.hub` -- Hugging Face hub ids (snapshots in the HF cache)
- :mod:`zo.models.bundled` -- the bundled SmolLM2, converted from GGUF into zo's cache
- :mod:`zo.models.fingerprint` -- ``model_fingerprint``
"""

from zo.models.bundled import (
    BUNDLED_MODEL,
    BundledModelUnavailableError,
    bundled_gguf_path,
    bundled_model_dir,
    default_cache_dir,
)
from zo.models.fingerprint import model_fingerprint, streamed_fingerprint
from zo.models.hub import hub_snapshot, is_hub_id
from zo.models.loading import (
    check_model_name,
    checkpoint_directory,
    checkpoint_path,
    load_model,
    load_tokenizer,
    local_architecture,
    resolve_dtype,
)
from zo.models.registry import (
    FAMILIES,
    MODELS,
    FamilyTraits,
    Loader,
    ModelFamily,
    ModelNotFoundError,
    ModelTraits,
    UnknownFamilyError,
    UnsupportedModelError,
    architecture_for,
    available_families,
    available_models,
    family_config_class,
    family_model_class,
    family_of,
    get_family,
    get_model,
    is_registered_model,
    register_family,
    register_model,
    tiny_family_of,
)
from zo.models.tiny import (
    MASKED_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    TINY_MAX_POSITIONS,
    TinySpec,
    byte_tokenizer,
    masked_byte_tokenizer,
    tiny_config,
    tiny_model,
)

__all__ = [
    "BUNDLED_MODEL",
    "FAMILIES",
    "MASKED_SPECIAL_TOKENS",
    "MODELS",
    "SPECIAL_TOKENS",
    "TINY_MAX_POSITIONS",
    "BundledModelUnavailableError",
    "FamilyTraits",
    "Loader",
    "ModelFamily",
    "ModelNotFoundError",
    "ModelTraits",
    "TinySpec",
    "UnknownFamilyError",
    "UnsupportedModelError",
    "architecture_for",
    "available_families",
    "available_models",
    "bundled_gguf_path",
    "bundled_model_dir",
    "byte_tokenizer",
    "check_model_name",
    "checkpoint_directory",
    "checkpoint_path",
    "default_cache_dir",
    "family_config_class",
    "family_model_class",
    "family_of",
    "get_family",
    "get_model",
    "is_registered_model",
    "hub_snapshot",
    "is_hub_id",
    "load_model",
    "load_tokenizer",
    "local_architecture",
    "masked_byte_tokenizer",
    "model_fingerprint",
    "streamed_fingerprint",
    "register_family",
    "register_model",
    "resolve_dtype",
    "tiny_config",
    "tiny_family_of",
    "tiny_model",
]
