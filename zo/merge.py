"""``zo merge``: base checkpoint + mask + trained values -> a dense checkpoint, ``W[idx] += v``.

Works shard by shard on the safetensors files, so memory is one shard, never the model,
and the result is the base checkpoint's directory with the touched weights changed (config,
tokenizer and shard index copied): ``from_pretrained(OUT)`` loads it like the base. It is
written to a temporary directory next to ``--out`` and renamed into place, so a crash never
leaves a half-written checkpoint; the next merge into the same ``--out`` removes what a
killed one left behind. Everything is checked before a byte is written.

The sum is formed in fp32 and rounded once to the stored dtype. A bf16 base rounds away
deltas below ~1/256 of a weight: ``--dtype float32`` keeps them (every float tensor upcast).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zo.sparse_delta import SparseDeltaError, check_indices, read_mask_indices, read_values

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
    except (MergeError, SparseDeltaError) as error:
        print(f"zo merge: {error}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0


def plan_merge(model_dir: Path, mask_path: str | Path, values_path: str | Path) -> MergePlan:
    """Check that model, mask and values fit; say which shard holds which masked weight."""
    if not (model_dir / "config.json").is_file():
        raise MergeError(f"--model {model_dir} is not a Hugging Face checkpoint (no config.json)")
    shard_paths = sorted(model_dir.glob("*.safetensors"))
    if not shard_paths:
        raise MergeError(f"--model {model_dir} holds no *.safetensors weights (save_pretrained)")
    indices, values = read_mask_indices(mask_path), read_values(values_path)
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
    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser()
    clean_interrupted(out)
    if out.exists() and not overwrite:
        raise MergeError(f"--out {out} already exists (pass --overwrite to replace it)")
    if out.resolve() == model_dir.resolve():
        raise MergeError("--out must differ from --model (the base stays as it is)")
    plan = plan_merge(model_dir, mask_path, values_path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for item in model_dir.iterdir():
            if item.suffix != ".safetensors" and item.is_file():
                shutil.copy2(item, tmp / item.name)
        for shard, names in plan.shards.items():
            _merge_shard(shard, names, plan, tmp / shard.name, dtype)
        if dtype is not None:
            _set_config_dtype(tmp / "config.json", dtype)
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def clean_interrupted(out: Path) -> None:
    """Undo what a merge into ``out`` killed midway left (``.OUT.tmp-PID``: a checkpoint
    being written; ``.OUT.old-PID``: the previous ``out`` during ``--overwrite``'s swap).
    The merge of a live pid is left alone; of a dead one, the previous ``out`` is restored
    if the kill fell between the two renames, and the unfinished one removed."""
    for kind in ("old", "tmp"):  # the previous out first: it is restored, never removed
        for leftover in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = leftover.name.rpartition("-")[2]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                os.replace(leftover, out)
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had this pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


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
