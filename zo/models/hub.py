"""Hugging Face hub ids as ``model.name``: a snapshot of the weights (safetensors only), config
and tokenizer in the HF cache, and errors that say what to do when the hub cannot serve it."""

from __future__ import annotations

import re
from pathlib import Path

from zo.models.registry import ModelNotFoundError, architecture_for, available_models

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
"""``org/name`` as the hub spells repo ids: one slash, no path-like leading dots."""


def is_hub_id(name: str) -> bool:
    """Shaped like a hub id and not an existing path (a local directory always wins)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not Path(name).exists()


HUB_FILES = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""What a snapshot fetches: weights as safetensors only (never pickles, nor the duplicate
``original/`` or ``consolidated`` weights some repos also hold), config and tokenizer."""


def hub_snapshot(repo_id: str, trust_remote_code: bool = False) -> Path:
    """The local directory of hub model ``repo_id``: ``huggingface_hub.snapshot_download``
    of :data:`HUB_FILES` into the HF cache (``HF_HOME``); later calls, and calls with
    ``HF_HUB_OFFLINE=1``, read the cache.

    ``config.json`` comes first, so an unsupported model type fails before gigabytes of
    weights download. A failure is a :class:`ModelNotFoundError` that says what to do.
    """
    config_only = _snapshot_download(repo_id, ["config.json"])
    if not (config_only / "config.json").is_file():
        raise ModelNotFoundError(
            f"hub repo {repo_id!r} has no config.json, so it is not a transformers "
            f"checkpoint: check the id at https://huggingface.co/{repo_id}"
        )
    architecture_for(config_only, trust_remote_code, source=f"hub model {repo_id!r}")
    directory = _snapshot_download(repo_id, list(HUB_FILES))
    if not any(directory.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"hub model {repo_id!r} has no safetensors weights in {directory} (zo loads no "
            "pickled .bin files), or its cached snapshot is incomplete: convert it once "
            "(transformers from_pretrained, then save_pretrained) and pass that directory as "
            "model.name, or download it with network before using HF_HUB_OFFLINE=1"
        )
    return directory


def _snapshot_download(repo_id: str, patterns: list[str]) -> Path:
    import huggingface_hub
    from huggingface_hub import errors

    page = f"https://huggingface.co/{repo_id}"
    elsewhere = "or download it where you can and pass its local directory instead"
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except errors.GatedRepoError:
        # before RepositoryNotFoundError: to the hub client a gated repo is a kind of not-found
        raise ModelNotFoundError(
            f"hub model {repo_id!r} is gated and this machine has no access to it: accept its "
            f"licence at {page}, then log in with `hf auth login` (`huggingface-cli login` in "
            f"older huggingface_hub) or set HF_TOKEN; {elsewhere}"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"no hub model {repo_id!r} that this machine can see: check the id at {page} (a "
            f"private repo needs `hf auth login`); registered names are {available_models()}, "
            "and a local directory needs a config.json"
        ) from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as error:
        raise ModelNotFoundError(
            f"hub model {repo_id!r} is not in the Hugging Face cache and the hub cannot be "
            f"reached ({_one_line(error)}): run `hf download {repo_id}` where there is network "
            "and share its cache (HF_HOME), or pass a local checkpoint directory instead (there "
            f"is no directory {repo_id!r} here)"
        ) from None
    except errors.HfHubHTTPError as error:
        raise ModelNotFoundError(
            f"the hub refused hub model {repo_id!r} ({_one_line(error)}): check the id at "
            f"{page} and your access (`hf auth login`), {elsewhere}"
        ) from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
