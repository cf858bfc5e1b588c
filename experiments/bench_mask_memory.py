"""Peak memory of computing a sensitive mask: backward hooks vs full gradients vs LOMO.

Each mode runs in a fresh process on the same model and calibration batches and reports its
peak memory above the loaded model (RSS on CPU, the caching allocator on CUDA):

- ``hooks``: ``zo.masks.build_mask(selection="sensitive")`` -- squared gradients reduced to
  top-k candidates inside ``register_post_accumulate_grad_hook`` and freed at once;
- ``naive``: the dense reference -- every targeted ``.grad`` kept, squared and summed into
  a full fp32 accumulator per weight;
- ``lomo``: the same backwards with hooks that only free each gradient (the floor of any
  method that looks at every gradient once).

Usage (repository root)::

    .venv/bin/python experiments/bench_mask_memory.py                 # bundled SmolLM2-135M
    .venv/bin/python experiments/bench_mask_memory.py --model opt-125m-shape --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch

MODES = ("hooks", "naive", "lomo")


def load(name: str, device: str):
    from zo.engine import seeded
    from zo.models import bundled_model_dir, byte_tokenizer, load_model

    if name == "bundled":
        model, tokenizer = load_model(str(bundled_model_dir()), dtype="float32", attn="eager")
    else:  # an OPT-125m-shaped random model: no download needed
        import transformers

        config = transformers.OPTConfig(
            vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768,
        )  # fmt: skip
        config._attn_implementation = "eager"
        with seeded(0):
            model = transformers.OPTForCausalLM(config)
        tokenizer = byte_tokenizer()  # byte ids < 260 are valid OPT ids
    return model.to(device).eval(), tokenizer


def naive(model, targets, batches) -> None:
    scores = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in targets}
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in targets:
            scores[name] += p.grad.float().square()
        # grads stay allocated between batches, as gradient accumulation keeps them
        model.zero_grad(set_to_none=False)


def lomo(model, targets, batches) -> None:
    def free(param) -> None:
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(free) for _, p in targets]
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
    for handle in handles:
        handle.remove()


def worker(args: argparse.Namespace) -> dict:
    from zo.calibration import read_texts, tokenize_chunks
    from zo.masks import build_mask, mask_targets, only_targets_need_grad
    from zo.memory import (
        current_rss_bytes,
        peak_memory_bytes,
        reset_peak_memory,
        return_large_frees_to_os,
    )

    return_large_frees_to_os()  # freed layer-sized temporaries leave RSS (see zo.memory)
    model, tokenizer = load(args.model, args.device)
    targets = mask_targets(model)
    chunks = tokenize_chunks(read_texts(), tokenizer, args.seq_len, args.tokens)
    batches = [b.to(args.device) for b in chunks.split(args.batch_size)]
    # A forward first: weights loaded from safetensors are mmapped and only count in RSS once
    # touched; without this the "extra" of every mode would include the model itself.
    with torch.no_grad():
        model(input_ids=batches[0])
    gc.collect()
    cuda = args.device == "cuda"
    baseline = torch.cuda.memory_allocated() if cuda else current_rss_bytes()
    reset_peak_memory(args.device)
    if args.mode == "hooks":
        result = build_mask(
            model,
            tokenizer,
            density=args.density,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            max_tokens=args.tokens,
        )
        extra = {"passes": result.stats.passes, "fallback_numel": result.stats.fallback_numel}
    else:
        with only_targets_need_grad(model, [p for _, p in targets]):
            {"naive": naive, "lomo": lomo}[args.mode](model, targets, batches)
        extra = {}
    peak = peak_memory_bytes(args.device)
    return {
        "mode": args.mode,
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "extra_bytes": peak - baseline,
        "targeted_numel": sum(p.numel() for _, p in targets),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens": chunks.numel(),
        "batches": len(batches),
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled", choices=["bundled", "opt-125m-shape"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=768, help="calibration tokens in all")
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--worker", choices=MODES, dest="mode")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--worker", mode, *sys.argv[1:]]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    from zo.memory import format_bytes

    first = results["hooks"]
    print(
        f"model {args.model} on {args.device}: {first['parameters']:,} parameters, "
        f"{first['targeted_numel']:,} targeted (fp32 copy {format_bytes(4 * first['targeted_numel'])}); "
        f"{first['tokens']} tokens in {first['batches']} batches of {args.batch_size}x{args.seq_len}; "
        f"density {args.density}; mask passes {first['passes']}, "
        f"dense fallback {first['fallback_numel']:,} entries"
    )
    print(f"{'mode':<6} {'peak above loaded model':>24} {'process peak':>14}")
    for mode, run in results.items():
        print(
            f"{mode:<6} {format_bytes(run['extra_bytes']):>24} {format_bytes(run['peak_bytes']):>14}"
        )
    hooks, naive_run, lomo_run = (results[m]["extra_bytes"] for m in MODES)
    print(f"hooks / lomo  = {hooks / lomo_run:.2f}")
    print(f"naive / hooks = {naive_run / hooks:.2f}")


if __name__ == "__main__":
    main()
