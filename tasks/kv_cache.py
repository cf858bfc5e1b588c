"""A backbone's KV cache, spoken in the names of whichever transformers release is installed.

transformers 5.24 renamed the cache keyword of the backbones' `forward`, and the field of
their outputs, from `past_key_values` to `cache`; the old names stay deprecated aliases
(a warning each call) for a while. Guessing the name wrong is worse than an error: a
backbone before 5.24 takes `cache=` into its `**kwargs` and runs as if no cache had been
given. So the keyword is the one the backbone's `forward` declares (`cache_keyword`), the
object that comes back must be a `transformers.Cache` (`returned_cache`), and the callers
check that a forward read the cache they passed (`tasks.prefix_cache`).

Imports no torch or transformers at module load: `import tasks` stays fast.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tasks.base import TaskError

if TYPE_CHECKING:
    from torch import nn

CACHE_KEYWORDS = ("cache", "past_key_values")
"""The names a backbone takes its KV cache by, newest first (transformers >= 5.24, before)."""


def _forward_parameters(backbone: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(backbone.forward).parameters)
    except (TypeError, ValueError):  # a forward without a readable signature (C code)
        return set()


def cache_keyword(backbone: nn.Module) -> str | None:
    """The keyword `backbone.forward` takes a KV cache by; None where it takes none."""
    parameters = _forward_parameters(backbone)
    return next((name for name in CACHE_KEYWORDS if name in parameters), None)


def why_no_kv_cache(backbone: nn.Module) -> str | None:
    """Why `backbone` cannot run a forward that continues a KV cache at given positions;
    None where it can."""
    parameters = _forward_parameters(backbone)
    wanted = ["position_ids", "use_cache"]
    missing = [name for name in wanted if name not in parameters]
    if cache_keyword(backbone) is None:
        missing.insert(0, " or ".join(f"`{name}`" for name in CACHE_KEYWORDS))
    if not missing:
        return None
    return (
        f"{type(backbone).__name__}.forward takes no {', '.join(missing)} argument, so it "
        "cannot continue from a KV cache"
    )


def returned_cache(backbone: nn.Module, output: Any) -> Any:
    """The `transformers.Cache` a forward with `use_cache=True` returned; an error naming
    the backbone where it returned none or something else."""
    from transformers.cache_utils import Cache  # transformers loads only with a model

    cache = None
    if isinstance(output, Mapping):  # a ModelOutput; a tuple output carries no named cache
        # The new name first: reading the old one from a newer output logs a deprecation.
        name = next((name for name in CACHE_KEYWORDS if name in output), None)
        cache = output[name] if name is not None else None
    if not isinstance(cache, Cache):
        raise TaskError(
            f"{type(backbone).__name__} returned {type(cache).__name__} where a forward with "
            "use_cache=True returns a transformers Cache: this model cannot continue from "
            "a KV cache here"
        )
    return cache


__all__ = ["CACHE_KEYWORDS", "cache_keyword", "returned_cache", "why_no_kv_cache"]
