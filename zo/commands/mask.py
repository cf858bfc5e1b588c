"""Compute a sparse-ZO parameter mask and write it as a safetensors file (``zo mask``).

Example: ``zo mask --model smollm2-135m --out masks/smollm2.safetensors --density 0.001``
ranks every decoder-block weight entry by squared gradients summed over the bundled
calibration text and keeps the top 0.1% (see zo/masks.py for the selections and exactness).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zo.commands.common import UsageError

EXAMPLE = "zo mask --model smollm2-135m --out masks/smollm2.safetensors --density 0.001"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from zo.masks import SELECTIONS

    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="registered model name (see `zo list models`), a local Hugging Face directory, or a hub id (org/name)",
    )
    parser.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--density", type=float, default=0.001, help="fraction of entries kept")
    parser.add_argument(
        "--selection",
        default="sensitive",
        choices=sorted(SELECTIONS),
        help="; ".join(f"{name}: {s.description}" for name, s in SELECTIONS.items()),
    )
    parser.add_argument(
        "--calibration",
        nargs="+",
        metavar="FILE",
        help=".txt (blank-line separated documents) or .jsonl ({'text': ...}); "
        "default: the bundled corpus",
    )
    parser.add_argument("--tokens", type=int, help="use at most this many calibration tokens")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration chunk")
    parser.add_argument(
        "--batch-size", type=int, default=4, help="chunks per backward (one squared gradient)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random selection")
    parser.add_argument(
        "--include-embeddings",
        action="store_true",
        help="also rank the input embedding and LM head (default: decoder-block Linears only)",
    )
    parser.add_argument(
        "--pool-factor",
        type=int,
        default=4,
        help="candidates kept per batch, in units of k (more: fewer dense fallbacks)",
    )
    parser.add_argument("--dtype", default="float32", help="model dtype (float32, bf16, fp16)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda if present)")
    parser.add_argument(
        "--checkpoint",
        action="store_true",
        help="recompute block activations in backward (less memory, one more forward)",
    )


def _check(options: argparse.Namespace) -> list[str]:
    """Everything checkable before the model loads; returns the calibration documents."""
    from zo.calibration import read_texts
    from zo.masks import SELECTIONS, budget

    budget(options.density, 1)
    out = Path(options.out)
    if out.exists() and not options.force:
        raise UsageError(f"--out {out} exists; pass --force to overwrite it")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name")
    positive = {"--seq-len": options.seq_len, "--batch-size": options.batch_size}
    positive["--pool-factor"] = options.pool_factor
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be at least 1 (got {value})")
    if options.tokens is not None and options.tokens < options.seq_len:
        raise UsageError(f"--tokens {options.tokens} is less than one --seq-len chunk")
    if not SELECTIONS[options.selection].needs_data:
        return []
    return read_texts(options.calibration)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
    return device


def run(options: argparse.Namespace) -> int:
    import time

    import torch

    from zo.blocks import checkpoint_blocks
    from zo.calibration import source_label
    from zo.masks import build_mask, save_mask, validate_mask
    from zo.memory import (
        current_rss_bytes,
        format_bytes,
        peak_memory_bytes,
        reset_peak_memory,
    )
    from zo.models import load_model, model_fingerprint

    texts = _check(options)
    device = _device(options.device)
    model, tokenizer = load_model(options.model, dtype=options.dtype)
    model.to(device)
    if options.checkpoint:
        checkpoint_blocks(model)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes()
    reset_peak_memory(device)
    started = time.perf_counter()
    result = build_mask(
        model,
        tokenizer,
        texts or None,
        options.density,
        options.selection,
        include_embeddings=options.include_embeddings,
        seq_len=options.seq_len,
        batch_size=options.batch_size,
        max_tokens=options.tokens,
        seed=options.seed,
        pool_factor=options.pool_factor,
    )
    seconds = time.perf_counter() - started
    peak = peak_memory_bytes(device)
    validate_mask(result.indices, model)
    metadata = {
        "density": repr(options.density),
        "source": source_label(options.calibration) if texts else "none",
        "selection": options.selection,
        "tokens": str(result.tokens),
        "model_id": str(options.model),
        "model_fingerprint": model_fingerprint(model),
        "seq_len": str(options.seq_len),
        "batch_size": str(options.batch_size),
        "seed": str(options.seed),
        "include_embeddings": str(options.include_embeddings).lower(),
        "targeted_numel": str(result.targeted_numel),
    }
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_mask(out, result.indices, metadata)
    _summary(options, result, seconds, peak - baseline, peak, device, format_bytes)
    print(f"wrote {out}")
    return 0


def _summary(options, result, seconds, extra, peak, device, format_bytes) -> None:
    from zo.calibration import source_label

    kept = sum(t.numel() for t in result.indices.values())
    stats = result.stats
    print(
        f"selection {options.selection}: kept {kept:,} of {result.targeted_numel:,} entries "
        f"(density {kept / result.targeted_numel:.6f}) in {len(result.indices)} matrices"
    )
    if result.tokens:
        print(
            f"calibration: {source_label(options.calibration)}, {result.tokens:,} tokens, "
            f"{stats.batches} batches, {stats.passes} pass(es), {stats.candidates:,} candidates; "
            f"dense fallback on {stats.fallback_numel:,} entries"
        )
    ranked = sorted(result.indices.items(), key=lambda item: -item[1].numel())
    for name, indices in ranked[:5]:
        print(f"  {indices.numel():>10,}  {name}")
    if len(ranked) > 5:
        print(f"  ... {len(ranked) - 5} more matrices")
    print(
        f"peak memory: {format_bytes(extra)} above the loaded model ({format_bytes(peak)} in all, "
        f"{device.type}); {seconds:.1f} s"
    )
