"""``zo merge``: base checkpoint + mask + trained values -> a dense checkpoint, ``W[idx] += v``.

Works shard by shard on the safetensors files, so memory is one shard, never the model,
and the result is the base checkpoint's directory with the touched weights changed: config,
tokenizer, generation config and shard index are copied, while weight files the index does not
name (old shards, other formats) and the bundled model's conversion marker are not, so
``from_pretrained(OUT)`` loads it like the base. It is built in a staging directory next to
``--out`` and renamed into place (:mod:`zo.staging`), so a crash never leaves a half-written
checkpoint. Everything is checked before a byte is written. ``zo export`` of a mask run
calls :func:`merge_values` with the run's checkpoint.

The sum is formed in fp32 and rounded once to the stored dtype. A bf16 base rounds away
deltas below ~1/256 of a weight: ``--dtype float32`` keeps them (every float tensor upcast).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zo.sparse_delta import SparseDeltaError, check_indices, read_mask_indices, read_values
from zo.staging import OutputDirectoryError, staged_directory

DTYPES = {
    "keep": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class MergeError(ValueError):
    """Model, mask and values do not fit together; nothing was written."""


@dataclass(frozen=True)
class MergePlan:
    shards: dict[Path, list[str]]
    """Every safetensors shard and the mask's weights in it (possibly none)."""
    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base HF checkpoint directory")
    parser.add_argument("--mask", required=True, help="mask file (zo mask)")
    parser.add_argument(
        "--values", required=True, help="trained values (save_values, or a run's checkpoint)"
    )
    parser.add_argument("--out", required=True, help="directory for the merged checkpoint")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="keep",
        help="dtype of the merged float tensors (keep = the base's)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(options: argparse.Namespace) -> int:
    try:
        out = merge(
            options.model,
            options.mask,
            options.values,
            options.out,
            dtype=DTYPES[options.dtype],
            overwrite=options.overwrite,
        )
    except (MergeError, SparseDeltaError, OutputDirectoryError) as error:
        print(f"zo merge: {error}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0


STALE_FILES = frozenset({"zo-bundled.json"})
"""Files of a base directory that describe that directory, not the model (the bundled
model's conversion marker): a merged or exported model must not carry them."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def weight_shards(model_dir: Path) -> list[Path]:
    """The safetensors files ``from_pretrained(model_dir)`` reads, in its order of preference:
    ``model.safetensors``, else the shards its index names. Other weight files there (old
    shards, another sharding's index, other formats) are not part of the model."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise MergeError(f"{index} is not a safetensors shard index: {error}") from None
        shards = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise MergeError(f"{index} names shards that are not there: {missing[:3]}")
        return shards
    raise MergeError(
        f"--model {model_dir} holds no model.safetensors (or {SAFETENSORS_INDEX}): "
        "save it with save_pretrained(safe_serialization=True)"
    )


def model_files(model_dir: Path) -> list[Path]:
    """What to copy beside the weights: config, tokenizer, generation config, chat template,
    licence; no weight files of any format, no index but the safetensors one, no marker."""
    kept = []
    for item in sorted(model_dir.iterdir()):
        name = item.name
        if not item.is_file() or name.startswith(".") or name in STALE_FILES:
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        kept.append(item)
    return kept


def plan_merge(
    model_dir: Path, indices: dict[str, torch.Tensor], values: dict[str, torch.Tensor]
) -> MergePlan:
    """Check that model, mask and values fit; say which shard holds which masked weight."""
    if not (model_dir / "config.json").is_file():
        raise MergeError(f"--model {model_dir} is not a Hugging Face checkpoint (no config.json)")
    shard_paths = weight_shards(model_dir)
    if set(indices) != set(values):
        raise MergeError(
            f"mask and values name different weights (was --values trained with this --mask?): "
            f"only in mask {sorted(set(indices) - set(values))[:3]}, "
            f"only in values {sorted(set(values) - set(indices))[:3]}"
        )
    shards: dict[Path, list[str]] = {}
    found: set[str] = set()
    for shard in shard_paths:
        with safe_open(str(shard), framework="pt") as handle:
            names = [n for n in handle.keys() if n in indices]  # noqa: SIM118 (not a dict)
            for name in names:
                shape = handle.get_slice(name).get_shape()
                numel = int(torch.Size(shape).numel())
                check_indices(indices[name], numel, f"mask entry {name} (weight {shape})")
                if values[name].shape != indices[name].shape:
                    raise MergeError(
                        f"{name}: {values[name].numel()} values for {indices[name].numel()} "
                        "mask indices (was --values trained with this --mask?)"
                    )
        shards[shard] = names
        found.update(names)
    missing = sorted(set(indices) - found)
    if missing:
        raise MergeError(
            f"mask weights {missing[:3]} are not in {model_dir}: was the mask made for this "
            "model? (a tied lm_head is stored under the embedding's name)"
        )
    return MergePlan(shards, indices, values)


def merge(
    model_dir: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    values_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model_dir`` with ``W.view(-1)[indices] += values`` to ``out``; returns ``out``."""
    indices, values = read_mask_indices(mask_path), read_values(values_path)
    return merge_values(model_dir, indices, values, out, dtype=dtype, overwrite=overwrite)


def merge_values(
    model_dir: str | os.PathLike[str],
    indices: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    out: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    protected: Sequence[Path] = (),
) -> Path:
    """:func:`merge` from tensors (weight name -> flat indices / values); ``protected``:
    more paths ``out`` must not replace. Everything is checked before a byte is written."""
    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser()
    if out.resolve() == model_dir.resolve():
        raise MergeError("--out must differ from --model (the base stays as it is)")
    plan = plan_merge(model_dir, indices, values)
    with staged_directory(out, overwrite, protected=[model_dir, *protected]) as staging:
        for item in model_files(model_dir):
            shutil.copy2(item, staging / item.name)
        for shard, names in plan.shards.items():
            _merge_shard(shard, names, plan, staging / shard.name, dtype)
        if len(plan.shards) > 1 or next(iter(plan.shards)).name != "model.safetensors":
            shutil.copy2(model_dir / SAFETENSORS_INDEX, staging / SAFETENSORS_INDEX)
        if dtype is not None:
            _set_config_dtype(staging / "config.json", dtype)
    return out


def _merge_shard(
    shard: Path, names: list[str], plan: MergePlan, target: Path, dtype: torch.dtype | None
) -> None:
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
    tensors = load_file(str(shard))
    for name in names:
        weight = tensors[name]
        merged = weight.to(torch.float32, copy=True).view(-1)
        merged.index_add_(0, plan.indices[name].long(), plan.values[name].float())
        # rounded once, from the fp32 sum straight to the stored (or requested) dtype
        tensors[name] = merged.view(weight.shape).to(dtype or weight.dtype)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(target), metadata=metadata)


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    config = json.loads(config_path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
