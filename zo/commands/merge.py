"""Merge trained mask values into a dense Hugging Face checkpoint: W.view(-1)[mask] += values,
shard by shard, written to a staging directory and renamed into place (zo.merge)."""

from __future__ import annotations

import argparse

EXAMPLE = (
    "zo merge --model BASE_DIR --mask masks/m.safetensors --values runs/mine/checkpoint "
    "--out merged"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from zo.merge import DTYPES

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
    from zo.merge import DTYPES, merge

    out = merge(
        options.model,
        options.mask,
        options.values,
        options.out,
        dtype=DTYPES[options.dtype],
        overwrite=options.overwrite,
    )
    print(f"merged checkpoint written to {out}")
    return 0
