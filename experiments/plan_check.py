"""Check ``zo plan`` against measured peaks on small random models, one fresh process each.

    .venv/bin/python experiments/plan_check.py [--device cpu|cuda] [--sizes tiny,small]
        [--families llama,opt] [--estimators zo_sgd,adamw,lomo] [--json]
        [--trainable lora:8 | mask:0.01] [--quant nf4 [--compute-dtype fp32]]
        [--model NAME_OR_DIR (a real model at batch 4 x 128)] [--checkpointing]

Per config a worker process builds a random model of the family (``zo.models`` tiny
configs at the size asked), runs two training steps (block_zo: one per unit, a whole cycle)
on random tokens with the project's
loss (logits only at the scored positions) and reports

* ``static``: bytes of the model's parameters and buffers (what is resident before a step);
* ``step``: the allocator peak during the steps above what was allocated before them:
  ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak of live tensor bytes that
  torch's profiler counts with ``profile_memory=True`` (the same quantity, without malloc
  slack or the runtime that peak RSS would add).

The plan predicts ``peak_allocated`` = resident + step transient; the table compares totals
(static + step) and the step part alone, each as predicted / measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
from pathlib import Path

import estimators
from zo.engine import EngineConfig
from zo.memory.shapes import ModelShape, shape_from_hf_config
from zo.memory.step import PlanRequest, plan_memory

ROOT = Path(__file__).resolve().parent.parent

SIZES = {  # hidden, layers, intermediate, heads, batch, seq, vocab
    "tiny": (256, 4, 768, 4, 8, 64, 4096),
    "small": (512, 8, 1536, 8, 8, 128, 8192),
    # two decoder layers of Llama-2-7B at its real widths: the per-layer peak of the 7B plan
    "7b-2l": (4096, 2, 11008, 32, 8, 256, 32000),
    # with --model: the named model's own shape, at this batch and sequence length
    "model": (0, 0, 0, 0, 4, 128, 0),
}
SCORED = 4


@dataclasses.dataclass
class Case:
    family: str
    size: str
    estimator: str
    device: str
    attention: str = "eager"
    dtype: str = "fp32"
    quant: str = "none"
    trainable: str = "full"
    compute_dtype: str = "fp32"
    model: str = ""
    """A model name or directory (``zo.models.load_model``) instead of a random family model;
    4-bit cases build random NF4 weights of its config (memory does not depend on values)."""
    checkpointing: bool = False
    """Activation checkpointing of every block (``zo.blocks.checkpoint_blocks``)."""

    def shape_args(self) -> dict:
        hidden, layers, inter, heads, batch, seq, vocab = SIZES[self.size]
        if self.family == "opt":
            inter = 4 * hidden
        return dict(hidden=hidden, layers=layers, inter=inter, heads=heads, vocab=vocab)

    def batch_seq(self) -> tuple[int, int]:
        _, _, _, _, batch, seq, _ = SIZES[self.size]
        return batch, seq


def build_model(case: Case):
    import torch

    from zo.engine import seeded
    from zo.models import TinySpec, family_model_class, get_family, tiny_config

    if case.model:
        return _named_model(case)
    args = case.shape_args()
    spec = TinySpec(
        vocab_size=args["vocab"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_positions=case.batch_seq()[1],
        hidden=args["hidden"],
        heads=args["heads"],
        intermediate=args["inter"],
        layers=args["layers"],
    )
    config = tiny_config(case.family, spec)
    config._attn_implementation = case.attention
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.dtype]
    if case.quant == "nf4":
        from zo.quant import build_random_quantized

        compute = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.compute_dtype]
        model = build_random_quantized(
            config,
            compute_dtype=compute,
            float_dtype=dtype,
            attn=case.attention,
            device=case.device,
        )
        return model, config
    with seeded(0):
        model = family_model_class(get_family(case.family))(config)
    return model.to(device=case.device, dtype=dtype).eval(), config


def _named_model(case: Case):
    import torch

    from zo.models import load_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.dtype]
    model, _ = load_model(case.model, dtype=dtype, attn=case.attention)
    if case.quant != "nf4":
        return model.to(case.device), model.config
    from zo.quant import build_random_quantized

    config = model.config
    del model
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.compute_dtype]
    quantized = build_random_quantized(
        config, compute_dtype=compute, float_dtype=dtype, attn=case.attention, device=case.device
    )
    return quantized, config


def trainable_set(model, case: Case) -> list:
    """``(name, parameter)`` pairs the estimator trains: every weight, LoRA adapters on
    PEFT's default q/v targets, or a random mask's sparse-delta values (a sensitive mask of
    the same density costs the same memory)."""
    if case.trainable == "full":
        return list(model.named_parameters())
    if case.trainable.startswith("lora:"):
        from zo.trainable import add_lora

        return add_lora(model, r=int(case.trainable.removeprefix("lora:")))
    from zo.masks import compute_mask
    from zo.sparse_delta import apply_sparse_deltas

    density = float(case.trainable.removeprefix("mask:"))
    return apply_sparse_deltas(model, compute_mask(model, selection="random", density=density))


def resident_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage once, plus the quantization
    state of 4-bit weights (absmax, code, and their own state when double-quantized)."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, state.offset) if t is not None]
            state = state.state2 if state.nested else None
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in tensors
        if isinstance(t, torch.Tensor)
    }
    return sum(storages.values())


def request_for(case: Case, shape: ModelShape) -> PlanRequest:
    batch, seq = case.batch_seq()
    trainable, lora_r = case.trainable, 8
    if trainable.startswith("lora:"):  # plan_check's lora:R is a rank; zo's lora:X targets
        trainable, lora_r = "lora", int(trainable.removeprefix("lora:"))
    return PlanRequest(
        shape=shape,
        estimator=estimators.get_estimator(case.estimator).planned(),
        dtype=case.dtype,
        batch=batch,
        seq_len=seq,
        scored=SCORED,
        attention=case.attention,
        device=case.device,
        engine=EngineConfig(threads=1),
        quant=case.quant,
        trainable=trainable,
        lora_r=lora_r,
        compute_dtype=case.compute_dtype,
        gradient_checkpointing=case.checkpointing,
    )


def scored_loss(model, backbone, head, ids, mask):
    """The project's loss shape (tasks.lm): hidden states gathered at the scored
    positions, the head there only, fp32 log-softmax, NLL of the next tokens."""
    import torch

    hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False)[0]
    batch, seq = ids.shape
    rows = torch.arange(batch, device=ids.device).repeat_interleave(SCORED)
    positions = torch.arange(seq - SCORED - 1, seq - 1, device=ids.device).repeat(batch)
    picked = hidden[rows, positions]
    log_probs = head(picked).float().log_softmax(dim=-1)
    targets = ids[rows, positions + 1]
    return -log_probs.gather(1, targets[:, None]).mean()


def worker(case: Case) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tasks.lm import backbone_and_head

    torch.set_num_threads(1)  # the profiler counts allocations of profiled threads only
    model, config = build_model(case)
    backbone, head = backbone_and_head(model)
    batch, seq = case.batch_seq()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, config.vocab_size, (batch, seq), generator=generator).to(case.device)
    mask = torch.ones_like(ids)
    spec = estimators.get_estimator(case.estimator)
    fields = {f.name for f in dataclasses.fields(spec.config_class)}
    named = trainable_set(model, case)
    if case.checkpointing:
        from zo.blocks import checkpoint_blocks

        checkpoint_blocks(model)
    optimizer = estimators.build_estimator(
        case.estimator,
        named,
        model=model,
        seed=0,
        engine=EngineConfig(threads=1),
        **({"lr": 1e-7} if "lr" in fields else {}),
    )
    static = resident_bytes(model)

    def steps() -> None:
        # two steps; block_zo a whole cycle, so its largest unit (the plan's worst case) runs
        for _ in range(max(2, len(getattr(optimizer, "units", ())))):
            optimizer.step(lambda: scored_loss(model, backbone, head, ids, mask))

    gc.collect()
    if case.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        steps()
        torch.cuda.synchronize()
        step = torch.cuda.max_memory_allocated() - before
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            steps()
        step = max(
            (e.total_allocated for e in _memory_events(prof)),
            default=0,
        )
    return {
        "static_bytes": static,
        "step_bytes": step,
        "config": config.to_dict(),
    }


def _memory_events(prof):
    """The profiler's allocation records: (bytes, running total of live profiled bytes)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    for event in events:
        if event.get("name") == "[memory]" and event["args"].get("Device Type") == 0:
            yield _Allocation(event["args"]["Bytes"], event["args"]["Total Allocated"])


@dataclasses.dataclass
class _Allocation:
    bytes: int
    total_allocated: int


def measure(case: Case) -> dict:
    """Run one case in a fresh interpreter, so nothing of another case is resident."""
    command = [sys.executable, __file__, "--worker", json.dumps(dataclasses.asdict(case))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"worker for {case} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(case: Case) -> dict:
    measured = measure(case)
    shape: ModelShape = shape_from_hf_config(measured["config"])
    plan = plan_memory(request_for(case, shape))
    resident = sum(plan.component(name) for name in RESIDENT)
    predicted_step = plan.peak_allocated - resident
    measured_total = measured["static_bytes"] + measured["step_bytes"]
    return {
        "case": f"{case.model or case.family + '-' + case.size} {case.estimator} ({case.device}, {case.attention}, "
        f"{case.dtype}{_quant_label(case)})",
        "predicted_total": plan.peak_allocated,
        "measured_total": measured_total,
        "total_ratio": plan.peak_allocated / measured_total,
        "predicted_static": resident,
        "measured_static": measured["static_bytes"],
        "predicted_step": predicted_step,
        "measured_step": measured["step_bytes"],
        "step_ratio": predicted_step / max(1, measured["step_bytes"]),
        "peak_phase": plan.peak_phase,
    }


RESIDENT = ("4-bit weights", "quant states", "dense weights", "trainable values", "mask indices")
"""Plan components resident before a step; the rest (optimizer state included: it is
created by the first step) is what a step adds."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--families", default="llama,opt")
    parser.add_argument("--estimators", default="zo_sgd,adamw,lomo")
    parser.add_argument("--attention", default="eager", choices=["eager", "sdpa"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--quant", default="none", choices=["none", "nf4"])
    parser.add_argument("--trainable", default="full", help="full | lora:R | mask:DENSITY")
    parser.add_argument("--compute-dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--model", default="", help="a model name or directory (--sizes model)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        print(json.dumps(worker(Case(**json.loads(options.worker)))))
        return 0
    rows = []
    sizes = ["model"] if options.model else options.sizes.split(",")
    families = [""] if options.model else options.families.split(",")
    for size in sizes:
        for family in families:
            for estimator in options.estimators.split(","):
                case = Case(
                    family,
                    size,
                    estimator,
                    options.device,
                    options.attention,
                    options.dtype,
                    options.quant,
                    options.trainable,
                    options.compute_dtype,
                    options.model,
                    options.checkpointing,
                )
                rows.append(compare(case))
                print(json.dumps(rows[-1]) if options.json else _row(rows[-1]), flush=True)
    worst = max(abs(r["total_ratio"] - 1) for r in rows)
    worst_step = max(abs(r["step_ratio"] - 1) for r in rows)
    print(f"worst |total ratio - 1| = {worst:.3f}; worst |step ratio - 1| = {worst_step:.3f}")
    return 0 if worst <= 0.15 else 1


def _quant_label(case: Case) -> str:
    quant = f", nf4 {case.compute_dtype} compute" if case.quant == "nf4" else ""
    checkpointing = ", checkpointing" if case.checkpointing else ""
    return quant + (f", {case.trainable}" if case.trainable != "full" else "") + checkpointing


def _row(row: dict) -> str:
    mib = 2**20
    return (
        f"{row['case']:<48} total {row['predicted_total'] / mib:8.1f} / "
        f"{row['measured_total'] / mib:8.1f} MiB = {row['total_ratio']:.3f}   "
        f"step {row['predicted_step'] / mib:7.1f} / {row['measured_step'] / mib:7.1f} MiB = "
        f"{row['step_ratio']:.3f}  [{row['peak_phase']}]"
    )


if __name__ == "__main__":
    sys.exit(main())
