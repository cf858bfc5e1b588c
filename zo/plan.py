"""Predict the peak memory of a training step, component by component, before any model loads.

``zo plan --model llama-2-7b --estimator zo_sgd --trainable mask:0.001 --quant nf4 --batch 16
--seq 256`` prints what each part of a step costs and the peak. The model is a shape (a size
preset, a local ``config.json``, or explicit dimensions); nothing is downloaded or built.

What the numbers mean:

* **peak (allocator)** is what ``torch.cuda.max_memory_allocated`` reports on CUDA, and the
  peak of live tensor bytes on CPU (what torch's profiler counts with ``profile_memory``):
  the weights and state that stay resident plus the largest transient of the step.
* **framework overhead** sits outside the allocator: the CUDA context (cuBLAS/cuDNN
  handles and kernels, a few hundred MiB, never in ``max_memory_allocated``), or on CPU the
  process's runtime (Python, torch, transformers), which peak RSS includes. It is added only
  to **process total**, and is a measured constant, not derived from the model.

The activation model counts the tensors alive at the worst moment of each phase (embedding,
one decoder layer, head); :class:`Architecture` documents the counts per family.
``experiments/plan_check.py`` checks predictions against measured peaks on small models.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from zo.sparse_chunks import backward_bytes_per_token, chunk_tokens, forward_bytes_per_token

GIB = 2**30
MIB = 2**20

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

CUDA_CONTEXT_BYTES = 528 * MIB
"""CUDA context + cuBLAS handles on an H100 (torch 2.x, lazy module loading): outside the
caching allocator, so absent from ``max_memory_allocated``; nvidia-smi shows it (measured
527 MiB with torch 2.11)."""
CPU_RUNTIME_BYTES = 384 * MIB
"""RSS of a process that imported torch 2.13 (CPU), transformers and the estimators before
building a model (measured 373 MiB); peak RSS = this + the allocator peak + malloc slack."""
CUBLAS_WORKSPACE_BYTES = 32 * MIB
"""cuBLAS workspace per handle, which torch allocates through its caching allocator (so it
is in max_memory_allocated): measured 32 MiB on an H100, torch 2.11. The autograd engine
runs CUDA backward on its own thread, with its own handle: first-order steps hold two."""
NF4_BLOCK = 64
NESTED_BLOCK = 256


class PlanError(ValueError):
    """An impossible or unknown planning request (the CLI exits with code 2)."""


# ---------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Architecture:
    """How a family lays out parameters, and which activations its layers keep alive.

    Activation counts are in units of ``tokens x hidden`` (``h``) and ``tokens x
    intermediate`` (``i``) tensors of the activation dtype, read off the HF modeling code.
    """

    gated_mlp: bool
    """SwiGLU (gate, up, down) instead of fc1 -> activation -> fc2."""
    attention_bias: bool
    """q/k/v projections carry biases."""
    linear_bias: bool
    """o_proj and MLP projections carry biases too."""
    layer_norm: bool
    """LayerNorm (weight + bias) instead of RMSNorm (weight)."""
    position_rows: int | None
    """Learned position table rows beyond ``max_position_embeddings`` (OPT: 2, RoBERTa: 0,
    its config already counts the padding offset); None for RoPE."""
    masked_lm_head: bool = False
    """RoBERTa's head: dense + LayerNorm + a vocabulary bias before the tied decoder."""
    inference_mlp_i: int = 3
    """MLP tensors of width ``i`` alive at once without grad: SwiGLU act(gate), up, product
    (3); fc1 output and its activation (2)."""
    inference_mlp_h: int = 3
    """Width-``h`` tensors alive during the MLP: the layer input (held by the caller), the
    mid-layer residual, and the normed input (Llama's MLP module holds it; OPT rebinds it
    to fc1's output, freeing it)."""
    stored_h: int = 10
    """Saved for backward per layer, width ``h``: layer input, two norm outputs and their
    normalised inputs (RMSNorm) or the norm inputs (LayerNorm), q, k, v, the attention
    output fed to o_proj, the mid-layer residual. Llama: 10; OPT: 8."""
    held_embeddings: int = 1
    """Embedding outputs the model's forward keeps in locals through every layer (Llama's
    ``inputs_embeds``; OPT's token and position embeddings)."""
    stored_embeddings: int = 0
    """Of those, saved for backward besides the first layer's input (OPT: both addends)."""
    stored_i: int = 4
    """Saved per layer, width ``i``: SwiGLU gate, act(gate), up, product (4); OPT: the ReLU
    output only (1); RoBERTa: GELU input and output (2)."""
    norm_weight_inputs_h: int = 2
    """Of ``stored_h``, kept only for the norm weights' gradients (RMSNorm's normalised
    inputs; LayerNorm keeps its statistics either way: 0). Frozen norms (LoRA, masks) drop
    them."""
    linear_only_h: int = 2
    """Of ``stored_h``, kept only as inputs of linear layers LoRA leaves frozen: o_proj's
    input and the post-attention norm's output (q/v's input stays: LoRA reads it)."""
    linear_only_i: int = 1
    """Of ``stored_i``, kept only as a frozen linear's input: SwiGLU's product (down_proj);
    OPT's ReLU output stays (ReLU keeps it); RoBERTa's GELU output (1)."""


LLAMA = Architecture(
    gated_mlp=True, attention_bias=False, linear_bias=False, layer_norm=False, position_rows=None
)
QWEN2 = replace(LLAMA, attention_bias=True)
OPT = Architecture(
    gated_mlp=False,
    attention_bias=True,
    linear_bias=True,
    layer_norm=True,
    position_rows=2,
    inference_mlp_i=2,
    inference_mlp_h=2,
    stored_h=8,
    stored_i=1,
    held_embeddings=2,
    stored_embeddings=2,
    norm_weight_inputs_h=0,
    linear_only_i=0,
)
ROBERTA = replace(
    OPT,
    position_rows=0,
    masked_lm_head=True,
    stored_i=2,
    held_embeddings=1,
    stored_embeddings=0,
    linear_only_i=1,
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "smollm2": LLAMA,
    "qwen2": QWEN2,
    "opt": OPT,
    "roberta": ROBERTA,
}


@dataclass(frozen=True)
class ModelShape:
    family: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    max_positions: int = 2048

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.family]

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def layer_matrices(self) -> list[tuple[int, int]]:
        """(out, in) of every linear layer of one decoder layer (what NF4 quantizes)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        attention = [(h, h), (kv, h), (kv, h), (h, h)]
        mlp = [(i, h), (i, h), (h, i)] if self.architecture.gated_mlp else [(i, h), (h, i)]
        return attention + mlp

    def layer_vectors(self) -> int:
        """Norm weights and biases of one decoder layer."""
        arch, h, i = self.architecture, self.hidden, self.intermediate
        count = 2 * h * (2 if arch.layer_norm else 1)
        if arch.attention_bias:
            count += h + 2 * self.kv_width
        if arch.linear_bias:
            count += h + (2 * i if arch.gated_mlp else i) + h
        return count

    def embedding_parameters(self) -> int:
        """Token (and position) embeddings, the final norm, an untied head, RoBERTa's head."""
        arch, h = self.architecture, self.hidden
        count = self.vocab * h + h * (2 if arch.layer_norm else 1)
        if arch.position_rows is not None:
            count += (self.max_positions + arch.position_rows) * h
        if not self.tied_embeddings:
            count += self.vocab * h
        if arch.masked_lm_head:  # token types (1 row), head dense + LayerNorm, vocab bias
            count += h + h * h + h + 2 * h + self.vocab
        return count

    def layer_matrix_parameters(self) -> int:
        return self.layers * sum(rows * cols for rows, cols in self.layer_matrices())

    def parameters(self) -> int:
        return (
            self.layer_matrix_parameters()
            + self.layers * self.layer_vectors()
            + self.embedding_parameters()
        )


def _shape(family, hidden, layers, inter, heads, kv, vocab, tied, positions) -> ModelShape:
    return ModelShape(family, hidden, layers, inter, heads, kv, vocab, tied, positions)


PRESETS: dict[str, ModelShape] = {
    "opt-125m": _shape("opt", 768, 12, 3072, 12, 12, 50272, True, 2048),
    "opt-1.3b": _shape("opt", 2048, 24, 8192, 32, 32, 50272, True, 2048),
    "opt-13b": _shape("opt", 5120, 40, 20480, 40, 40, 50272, True, 2048),
    "llama-2-7b": _shape("llama", 4096, 32, 11008, 32, 32, 32000, False, 4096),
    "llama-2-13b": _shape("llama", 5120, 40, 13824, 40, 40, 32000, False, 4096),
    "llama-3-8b": _shape("llama", 4096, 32, 14336, 32, 8, 128256, False, 8192),
    "mistral-7b": _shape("mistral", 4096, 32, 14336, 32, 8, 32000, False, 32768),
    "qwen2-0.5b": _shape("qwen2", 896, 24, 4864, 14, 2, 151936, True, 32768),
    "qwen2-7b": _shape("qwen2", 3584, 28, 18944, 28, 4, 152064, False, 32768),
    "smollm2-135m": _shape("llama", 576, 30, 1536, 9, 3, 49152, True, 8192),
    "roberta-large": _shape("roberta", 1024, 24, 4096, 16, 16, 50265, True, 514),
}
ALIASES = {"llama2-7b": "llama-2-7b", "llama2-13b": "llama-2-13b", "vicuna-7b": "llama-2-7b"}


def shape_from_hf_config(config: dict) -> ModelShape:
    """A :class:`ModelShape` from a Hugging Face ``config.json`` dict."""
    family = config.get("model_type", "")
    if family not in ARCHITECTURES:
        raise PlanError(
            f"config model_type {family!r} has no memory model; known: {sorted(ARCHITECTURES)}"
        )
    heads = config["num_attention_heads"]
    return ModelShape(
        family=family,
        hidden=config["hidden_size"],
        layers=config["num_hidden_layers"],
        intermediate=config.get("intermediate_size") or config["ffn_dim"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        vocab=config["vocab_size"],
        tied_embeddings=config.get("tie_word_embeddings", True),
        max_positions=config.get("max_position_embeddings", 2048),
    )


def resolve_shape(model: str) -> ModelShape:
    """A preset name (``llama-2-7b``), a ``config.json`` path, or a checkpoint directory."""
    name = ALIASES.get(model.lower(), model.lower())
    if name in PRESETS:
        return PRESETS[name]
    path = Path(model).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if path.is_file():
        return shape_from_hf_config(json.loads(path.read_text()))
    raise PlanError(
        f"unknown model {model!r}: give a preset ({', '.join(sorted(PRESETS))}), a config.json "
        "or a checkpoint directory, or the shape (--family --hidden --layers ...)"
    )


# ---------------------------------------------------------------------------------- request


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for: a model (preset name, config path, or ``shape``), and the run."""

    model: str | None = None
    shape: ModelShape | None = None
    """Explicit dimensions; wins over ``model``."""
    estimator: str = "zo_sgd"
    trainable: str = "full"
    """``full``, ``lora:R`` (PEFT's default q/v targets) or ``mask:DENSITY``."""
    quant: str = "none"
    """``none`` or ``nf4`` (the decoder's linear layers in 4 bits, the rest in ``dtype``)."""
    compute_dtype: str = "bf16"
    """NF4 compute dtype (``fp32`` on CPU): the dtype of activations and dequantized weights."""
    double_quant: bool = True
    """NF4 absmax quantized again to 8 bits (bitsandbytes ``compress_statistics``), as
    :mod:`zo.quant` loads and builds 4-bit models by default."""
    dtype: str = "auto"
    """Dtype of the (non-4-bit) weights: ``fp32``, ``bf16``, ``fp16``; auto = fp32 on CPU,
    bf16 on CUDA."""
    batch: int = 16
    """Sequences per micro-batch (candidates count as sequences)."""
    seq_len: int = 256
    scored: int = 1
    """Positions scored per sequence (logits only there); ignored with ``logits='full'``."""
    logits: str = "scored"
    """``scored`` (this project) or ``full`` (a sequence x vocabulary forward, as HF's loss)."""
    attention: str = "sdpa"
    """``eager`` materialises batch x heads x seq x seq scores; ``sdpa`` assumes a fused kernel."""
    gradient_checkpointing: bool = False
    device: str = "cuda"
    chunk_size: int = 0
    """Engine direction chunk (elements); 0 = the engine's default for the device."""
    threads: int = 0
    """Engine threads drawing chunks on CPU; 0 = min(8, CPU cores)."""

    def weight_dtype(self) -> str:
        if self.dtype == "auto":
            return "fp32" if self.device == "cpu" else "bf16"
        return self.dtype


@dataclass(frozen=True)
class EstimatorMemory:
    """What an estimator keeps besides the weights (in units of the trainable set)."""

    zeroth_order: bool
    state_copies: int = 0
    """Per-element state kept between steps: fp32 for ZO (engine rule), the parameter
    dtype for torch optimizers."""
    gradients: str = "none"
    """``none``; ``all`` (a .grad per trainable tensor); ``one`` (LOMO: one at a time)."""
    accumulator: bool = False
    """ZO updates that rebuild g_hat chunk by chunk (sign, momentum, Adam): one more chunk."""
    tangents: bool = False
    """Forward-mode AD: every activation carries a tangent of its size."""
    foreach_temp: bool = False
    """torch AdamW's multi-tensor path (CUDA) allocates sqrt(v) for the whole set at once."""
    kept_hidden_states: int = 0
    """Hidden states ([tokens, hidden]) kept through a step: block_zo's copy of the input of
    the perturbed block, reused by the step's later forwards, and the copy handed back."""


ESTIMATOR_MEMORY: dict[str, EstimatorMemory] = {
    "zo_sgd": EstimatorMemory(True),
    "zo_sgd_conservative": EstimatorMemory(True),
    "zo_sgd_sign": EstimatorMemory(True, accumulator=True),
    "zo_sgd_momentum": EstimatorMemory(True, state_copies=1, accumulator=True),
    "zo_adam": EstimatorMemory(True, state_copies=2, accumulator=True),
    "forward_grad": EstimatorMemory(True, tangents=True),
    "block_zo": EstimatorMemory(True, kept_hidden_states=2),
    "sgd": EstimatorMemory(False, gradients="all"),
    "adamw": EstimatorMemory(False, state_copies=2, gradients="all", foreach_temp=True),
    "lomo": EstimatorMemory(False, gradients="one"),
}


@dataclass(frozen=True)
class TrainableSpec:
    kind: str
    lora_r: int = 0
    density: float = 0.0


def parse_trainable(text: str) -> TrainableSpec:
    kind, _, value = text.partition(":")
    try:
        if kind == "full" and not value:
            return TrainableSpec("full")
        if kind == "lora":
            rank = int(value or 8)
            if rank >= 1:
                return TrainableSpec("lora", lora_r=rank)
        if kind == "mask":
            density = float(value or 0.001)
            if 0.0 < density <= 1.0:
                return TrainableSpec("mask", density=density)
    except ValueError:
        pass
    raise PlanError(
        f"trainable {text!r} is not understood; use full, lora:R (R >= 1) or mask:DENSITY "
        "(0 < DENSITY <= 1, e.g. mask:0.001)"
    )


# ---------------------------------------------------------------------------------- pieces


def nf4_bytes(numel: int, double_quant: bool = False) -> tuple[int, int]:
    """(packed weight, quant state) bytes of one matrix in bitsandbytes NF4, blocksize 64.

    Two 4-bit codes per byte; one absmax per 64-block (fp32, or uint8 plus an fp32 absmax
    per 256 blocks, a 256-entry fp32 code and an fp32 offset when double-quantized); the
    16-entry fp32 NF4 code.
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    if double_quant:
        state = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4
    else:
        state = 4 * blocks
    return math.ceil(numel / 2), state + 4 * 16


@dataclass
class Component:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    request: PlanRequest
    shape: ModelShape
    components: list[Component]
    """Resident parts (weights, states) and the transients of the peak phase."""
    peak_phase: str
    peak_allocated: int
    overhead: Component
    parameters: int
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)

    @property
    def process_total(self) -> int:
        return self.peak_allocated + self.overhead.bytes

    def component(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)

    def to_dict(self) -> dict:
        return {
            "request": asdict(self.request),
            "shape": asdict(self.shape),
            "parameters": self.parameters,
            "trainable_parameters": self.trainable_parameters,
            "components": {c.name: c.bytes for c in self.components},
            "component_notes": {c.name: c.note for c in self.components if c.note},
            "peak_phase": self.peak_phase,
            "peak_allocated_bytes": self.peak_allocated,
            "overhead": {"name": self.overhead.name, "bytes": self.overhead.bytes},
            "process_total_bytes": self.process_total,
            "notes": self.notes,
        }

    def table(self) -> str:
        rows = [(c.name, c.bytes, c.note) for c in self.components]
        rows += [
            (f"peak, allocator ({self.peak_phase})", self.peak_allocated, ""),
            (self.overhead.name, self.overhead.bytes, self.overhead.note),
            ("process total", self.process_total, ""),
        ]
        width = max(len(name) for name, _, _ in rows)
        lines = [f"{'component':<{width}}  {'GiB':>8}  note"]
        lines += [f"{name:<{width}}  {count / GIB:>8.3f}  {note}" for name, count, note in rows]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- planning

OFFLOAD_THRESHOLD = 1 << 22  # EngineConfig.offload_threshold / offload_max_rows defaults
OFFLOAD_MAX_ROWS = 64
CHUNK = {"cpu": 1 << 20, "cuda": 1 << 22}  # EngineConfig.chunk_size = 0, by device


@dataclass(frozen=True)
class _Run:
    """The request resolved to numbers: sizes in elements, dtypes in bytes."""

    shape: ModelShape
    request: PlanRequest
    estimator: EstimatorMemory
    trainable: TrainableSpec
    weight_bytes: int
    act_bytes: int
    tokens: int
    scored_rows: int

    @property
    def eager(self) -> bool:
        return self.request.attention == "eager"

    def linear_temp_bytes(self, rows: int, cols: int) -> int:
        """Temporaries of one ``rows x cols`` linear layer's call besides its output: a
        dequantized NF4 weight, or a perturbed copy of a dense trainable weight (ZO); then,
        once the base output exists, a sparse-delta layer's scratch (its gathered inputs,
        token chunk by token chunk without grad; see :mod:`zo.sparse_delta`)."""
        if self.request.quant == "nf4":
            weight = rows * cols * self.act_bytes
        elif self.estimator.zeroth_order and self.trainable.kind == "full":
            weight = rows * cols * self.weight_bytes
        else:
            weight = 0
        if self.trainable.kind != "mask":
            return weight
        per_token = forward_bytes_per_token(
            self.mask_entries(rows, cols), rows, *[self.act_bytes] * 2
        )
        tokens = self.tokens
        if not self.estimator.tangents:  # forward AD takes the whole block at once
            tokens = min(tokens, chunk_tokens(per_token))
        return max(weight, tokens * per_token)

    def mask_entries(self, rows: int, cols: int) -> int:
        return round(self.trainable.density * rows * cols)

    def sparse_backward_bytes(self) -> int:
        """A sparse-delta layer's backward: one token chunk's scratch and the fp32 input
        gradient it accumulates (plus its copy in the activation dtype)."""
        if self.trainable.kind != "mask":
            return 0
        s, worst = self.act_bytes, 0
        for rows, cols in self.shape.layer_matrices():
            per_token = backward_bytes_per_token(self.mask_entries(rows, cols), s, s)
            chunk = min(self.tokens, chunk_tokens(per_token)) * per_token
            grad_x = self.tokens * cols * (4 + (s if s < 4 else 0))
            worst = max(worst, chunk + grad_x)
        return worst

    def offloaded(self, numel: int, rows: int) -> bool:
        return numel > OFFLOAD_THRESHOLD and rows <= OFFLOAD_MAX_ROWS


def _validate(request: PlanRequest) -> ModelShape:
    choices = {
        "device": (request.device, ("cpu", "cuda")),
        "quant": (request.quant, ("none", "nf4")),
        "logits": (request.logits, ("scored", "full")),
        "attention": (request.attention, ("eager", "sdpa")),
        "dtype": (request.weight_dtype(), tuple(DTYPE_BYTES)),
        "compute_dtype": (request.compute_dtype, tuple(DTYPE_BYTES)),
        "estimator": (request.estimator, tuple(sorted(ESTIMATOR_MEMORY))),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise PlanError(
                f"{key} {value!r} is not supported by the planner; choose one of {valid}"
            )
    for key in ("batch", "seq_len", "scored"):
        if getattr(request, key) < 1:
            raise PlanError(f"{key} must be >= 1, got {getattr(request, key)}")
    if request.scored > request.seq_len:
        raise PlanError(f"scored ({request.scored}) cannot exceed seq_len ({request.seq_len})")
    if request.shape is None and request.model is None:
        raise PlanError("give a model (a preset, a config.json) or its shape")
    shape = request.shape or resolve_shape(request.model or "")
    if shape.family not in ARCHITECTURES:
        raise PlanError(
            f"family {shape.family!r} is unknown; choose one of {sorted(ARCHITECTURES)}"
        )
    if min(shape.hidden, shape.layers, shape.intermediate, shape.heads, shape.vocab) < 1:
        raise PlanError("hidden, layers, intermediate, heads and vocab must all be >= 1")
    if shape.hidden % shape.heads or shape.kv_heads < 1 or shape.heads % shape.kv_heads:
        raise PlanError(
            f"heads ({shape.heads}) must divide hidden ({shape.hidden}) and be a multiple "
            f"of kv_heads ({shape.kv_heads})"
        )
    if request.quant == "nf4" and parse_trainable(request.trainable).kind == "full":
        raise PlanError(
            "a 4-bit base is frozen: --trainable full is impossible with --quant nf4; "
            "train a mask (mask:0.001) or LoRA (lora:8) over it"
        )
    if request.estimator == "forward_grad" and request.attention != "eager":
        raise PlanError("forward_grad needs --attention eager (fused kernels have no jvp)")
    return shape


def _trainable_tensors(shape: ModelShape, spec: TrainableSpec) -> list[int]:
    """Element counts of the trainable tensors (tied weights once)."""
    if spec.kind == "full":
        matrices = [rows * cols for rows, cols in shape.layer_matrices()] * shape.layers
        rest = shape.parameters() - sum(matrices)
        big = [shape.vocab * shape.hidden] * (1 if shape.tied_embeddings else 2)
        return matrices + big + [rest - sum(big)]
    if spec.kind == "lora":  # PEFT's default targets: the q and v projections
        h, kv, r = shape.hidden, shape.kv_width, spec.lora_r
        return [r * h, r * h, r * h, r * kv] * shape.layers
    return [round(spec.density * rows * cols) for rows, cols in shape.layer_matrices()] * (
        shape.layers
    )


def _forward_phases(run: _Run) -> dict[str, int]:
    """Bytes alive (besides resident weights and state) at the worst moment of each phase
    of one forward pass without grad."""
    shape, request, s = run.shape, run.request, run.act_bytes
    arch, h, i, n = shape.architecture, shape.hidden, shape.intermediate, run.tokens
    batch, seq, heads = request.batch, request.seq_len, shape.heads
    mask = batch * seq * seq * (s if run.eager else 1)
    rope = 0 if arch.position_rows is not None else 2 * batch * seq * (h // heads) * s
    matrices = shape.layer_matrices()
    attention_weight = max(run.linear_temp_bytes(rows, cols) for rows, cols in matrices[:4])
    mlp_weight = max(run.linear_temp_bytes(rows, cols) for rows, cols in matrices[4:])

    qkv = n * (h + 2 * shape.kv_width) * s
    repeat = 2 * n * h * s if shape.kv_heads < heads and run.eager else 0
    scores = batch * heads * seq * seq * 8 if run.eager else n * h * s  # score + softmax
    rope_temps = 3 * n * h * s if rope else 0
    lora = n * h * s if run.trainable.kind == "lora" else 0
    attention = 2 * n * h * s + qkv + repeat + lora + max(scores, attention_weight, rope_temps)
    # the layer keeps eager attention's probabilities (returned, unused) through its MLP
    probabilities = batch * heads * seq * seq * s if run.eager else 0
    live_i = arch.inference_mlp_i
    mlp = arch.inference_mlp_h * n * h * s + probabilities
    mlp += max(live_i * n * i * s, (live_i - 1) * n * i * s + mlp_weight)
    held = arch.held_embeddings * n * h * s
    layer = mask + rope + held + max(attention, mlp)

    embed = n * h * s * (3 if arch.position_rows is not None else 1)
    vocab_numel = shape.vocab * shape.hidden
    zo_full = run.estimator.zeroth_order and run.trainable.kind == "full"
    if zo_full:  # a perturbed copy, or the output-side perturbation's fp32 rows
        output_side = n * h * 4 * (2 if request.device == "cuda" else 1)
        embed += output_side if run.offloaded(vocab_numel, 0) else vocab_numel * s
    head = 2 * n * h * s + run.scored_rows * h * s + _logits_bytes(run)
    if zo_full and not run.offloaded(vocab_numel, run.scored_rows):
        head += vocab_numel * run.weight_bytes
    phases = {"embedding": embed + mask + rope, "decoder layer": layer, "head": head}
    factor = 2 if run.estimator.tangents else 1
    return {name: factor * count for name, count in phases.items()}


def _logits_bytes(run: _Run) -> int:
    """Head output in the activation dtype, its fp32 copy, log-softmax (and for HF's full
    loss the shifted contiguous copy)."""
    s = run.act_bytes
    upcast = 4 if s < 4 else 0
    extra = 8 if run.request.logits == "full" else 4
    return run.scored_rows * run.shape.vocab * (s + upcast + extra)


def _stored_activations(run: _Run) -> int:
    """What autograd keeps from the forward for backward (first-order estimators)."""
    shape, request, s = run.shape, run.request, run.act_bytes
    arch, n = shape.architecture, run.tokens
    scores = request.batch * shape.heads * request.seq_len**2 * (4 + (s if s < 4 else 0))
    stored_h, stored_i = arch.stored_h, arch.stored_i
    if run.trainable.kind != "full":  # norms frozen; LoRA also freezes most linear layers
        stored_h -= arch.norm_weight_inputs_h
    if run.trainable.kind == "lora":
        stored_h, stored_i = stored_h - arch.linear_only_h, stored_i - arch.linear_only_i
    per_layer = (stored_h * n * shape.hidden + stored_i * n * shape.intermediate) * s
    per_layer += scores if run.eager else 0
    if not arch.layer_norm and s < 4:  # RMSNorm saves its fp32 upcast of the input, twice
        per_layer += 2 * n * shape.hidden * 4
    if request.gradient_checkpointing:  # layer inputs, plus one layer recomputed in backward
        layers = shape.layers * n * shape.hidden * s + per_layer
    else:
        layers = shape.layers * per_layer
    embeddings = arch.stored_embeddings * n * shape.hidden * s
    return layers + embeddings + 2 * n * shape.hidden * s + run.scored_rows * shape.hidden * s


def _backward_transient(run: _Run) -> int:
    """Gradients of activations alive while backward crosses one layer: the incoming and
    outgoing gradient of the MLP's wide tensors and of the hidden state, or eager
    attention's softmax backward (gradients of the probabilities and of the scores)."""
    shape, request, s = run.shape, run.request, run.act_bytes
    n = run.tokens
    mlp = 2 * n * shape.intermediate * s + 2 * n * shape.hidden * s
    scores = 2 * request.batch * shape.heads * request.seq_len**2 * 4 if run.eager else 0
    return max(mlp, scores, 2 * n * shape.intermediate * s + run.sparse_backward_bytes())


def plan_memory(request: PlanRequest) -> Plan:
    """Predict the peak memory of one training step of ``request``, per component."""
    shape = _validate(request)
    spec = parse_trainable(request.trainable)
    estimator = ESTIMATOR_MEMORY[request.estimator]
    wb = DTYPE_BYTES[request.weight_dtype()]
    act = DTYPE_BYTES[request.compute_dtype] if request.quant == "nf4" else wb
    tokens = request.batch * request.seq_len
    scored_rows = tokens if request.logits == "full" else request.batch * request.scored
    run = _Run(shape, request, estimator, spec, wb, act, tokens, scored_rows)
    parameters = shape.parameters()
    tensors = _trainable_tensors(shape, spec)
    trainable = sum(tensors)
    trainable_bytes = wb if spec.kind == "full" else 4

    components: list[Component] = []
    if request.quant == "nf4":
        packed = states = 0
        for rows, cols in shape.layer_matrices():
            weight, state = nf4_bytes(rows * cols, request.double_quant)
            packed, states = packed + weight, states + state
        dense = (parameters - shape.layer_matrix_parameters()) * wb
        components += [
            Component("4-bit weights", shape.layers * packed, "NF4, 0.5 byte/param"),
            Component(
                "quant states",
                shape.layers * states,
                "absmax per 64-block, " + ("double-quantized" if request.double_quant else "fp32"),
            ),
            Component("dense weights", dense, f"embeddings, head, norms, biases ({wb} B)"),
        ]
    else:
        components.append(Component("dense weights", parameters * wb, f"{wb} B/param"))
    if spec.kind == "mask":
        components += [
            Component("trainable values", trainable * 4, f"fp32, density {spec.density:g}"),
            Component("mask indices", trainable * 12, "int32: flat index, row, column"),
        ]
    elif spec.kind == "lora":
        components.append(Component("trainable values", trainable * 4, f"LoRA r={spec.lora_r}"))

    state_bytes = 4 if estimator.zeroth_order else trainable_bytes
    state = estimator.state_copies * trainable * state_bytes
    if state:
        components.append(Component("optimizer state", state, f"{estimator.state_copies} copies"))

    phases = _forward_phases(run)
    if estimator.zeroth_order:
        chunk = min(request.chunk_size or CHUNK[request.device], max(tensors))
        threads = 1 if request.device == "cuda" else request.threads or min(8, _cpu_count())
        # g_hat accumulator per thread; an fp32 copy of the chunk for low-precision weights
        copies = 1 + estimator.accumulator + (spec.kind == "full" and wb < 4)
        scratch = chunk * 4 * threads * copies
        peak_phase = max(phases, key=phases.__getitem__)
        layer_phase = phases["decoder layer"]
        components += [
            Component("activations", layer_phase, "one decoder layer at a time, no grad"),
            Component("logits", _logits_bytes(run), f"{scored_rows} rows x vocab"),
            Component("direction chunk", scratch, f"{chunk} fp32 x {copies} x {threads} thread(s)"),
        ]
        kept = estimator.kept_hidden_states * run.tokens * shape.hidden * run.act_bytes
        if kept:
            note = f"{estimator.kept_hidden_states} x tokens x hidden, reused forwards"
            components.append(Component("kept hidden states", kept, note))
        transient = phases[peak_phase] + scratch + kept
        peak_phase = f"forward, {peak_phase}"
    else:
        stored = _stored_activations(run)
        largest = max(tensors) * trainable_bytes
        grads = trainable * trainable_bytes if estimator.gradients == "all" else largest
        if estimator.gradients == "one" and trainable_bytes < 4:  # LOMO updates in fp32
            largest += max(tensors) * 4
        layer_transient = _backward_transient(run)
        step_temp = 0
        if estimator.gradients == "all" and estimator.state_copies:
            step_temp = trainable * trainable_bytes if request.device == "cuda" else 2 * largest
        candidates = {
            "forward end": stored + _logits_bytes(run),
            "backward": stored + largest + layer_transient,
            "optimizer step": grads + step_temp,
        }
        peak_phase = max(candidates, key=candidates.__getitem__)
        components += [
            Component("activations", stored, "stored for backward"),
            Component("logits", _logits_bytes(run), f"{scored_rows} rows x vocab"),
            Component("gradients", grads, "all" if estimator.gradients == "all" else "largest"),
        ]
        transient = candidates[peak_phase]

    if request.device == "cuda":
        handles = 1 if estimator.zeroth_order else 2
        workspace = handles * CUBLAS_WORKSPACE_BYTES
        components.append(Component("cuBLAS workspace", workspace, f"{handles} handle(s)"))
        transient += workspace
    resident = sum(c.bytes for c in components if c.name not in TRANSIENT)
    overhead = (
        Component("CUDA context", CUDA_CONTEXT_BYTES, "outside max_memory_allocated")
        if request.device == "cuda"
        else Component("process runtime", CPU_RUNTIME_BYTES, "python+torch+transformers RSS")
    )
    return Plan(
        request=request,
        shape=shape,
        components=components,
        peak_phase=peak_phase,
        peak_allocated=resident + transient,
        overhead=overhead,
        parameters=parameters,
        trainable_parameters=trainable,
    )


TRANSIENT = {
    "activations",
    "logits",
    "direction chunk",
    "gradients",
    "cuBLAS workspace",
    "kept hidden states",
}


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------- command

SHAPE_OPTIONS = ("family", "hidden", "layers", "intermediate", "heads", "kv_heads", "vocab")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (a preset or config, optionally overridden)")
    model.add_argument("--model", help=f"preset ({', '.join(sorted(PRESETS))}) or config.json")
    model.add_argument("--family", choices=sorted(ARCHITECTURES))
    for name in SHAPE_OPTIONS[1:]:
        model.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    model.add_argument("--max-positions", type=int, dest="max_positions")
    tied = model.add_mutually_exclusive_group()
    tied.add_argument("--tied", dest="tied_embeddings", action="store_true", default=None)
    tied.add_argument("--untied", dest="tied_embeddings", action="store_false")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--estimator", default="zo_sgd", help=f"{sorted(ESTIMATOR_MEMORY)}")
    run_group.add_argument("--trainable", default="full", help="full | lora:R | mask:DENSITY")
    run_group.add_argument("--quant", default="none", help="none | nf4")
    run_group.add_argument("--compute-dtype", default=None, help="NF4 compute dtype")
    run_group.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NF4 absmax in 8 bits (zo's default when it loads a 4-bit model)",
    )
    run_group.add_argument("--dtype", default="auto", help="weights: fp32 | bf16 | fp16")
    run_group.add_argument("--batch", type=int, default=16)
    run_group.add_argument("--seq", "--seq-len", type=int, default=256, dest="seq_len")
    run_group.add_argument("--scored", type=int, default=1, help="scored positions per sequence")
    run_group.add_argument("--logits", default="scored", help="scored | full")
    run_group.add_argument("--attention", default="sdpa", help="sdpa | eager")
    run_group.add_argument("--gradient-checkpointing", action="store_true")
    run_group.add_argument("--device", default="cuda", help="cuda | cpu")
    run_group.add_argument("--chunk-size", type=int, default=0)
    run_group.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def request_from_options(options: argparse.Namespace) -> PlanRequest:
    overrides = {
        name: getattr(options, name)
        for name in (*SHAPE_OPTIONS, "max_positions", "tied_embeddings")
        if getattr(options, name, None) is not None
    }
    if options.model:
        shape = replace(resolve_shape(options.model), **overrides)
    else:
        missing = [f"--{n.replace('_', '-')}" for n in SHAPE_OPTIONS if n not in overrides]
        missing = [m for m in missing if m != "--kv-heads"]
        if missing:
            raise PlanError(f"give --model, or the whole shape: missing {' '.join(missing)}")
        overrides.setdefault("kv_heads", overrides["heads"])
        overrides.setdefault("tied_embeddings", overrides["family"] in ("opt", "roberta"))
        shape = ModelShape(**overrides)
    compute = options.compute_dtype or ("fp32" if options.device == "cpu" else "bf16")
    return PlanRequest(
        shape=shape,
        model=options.model,
        estimator=options.estimator,
        trainable=options.trainable,
        quant=options.quant,
        compute_dtype=compute,
        double_quant=options.double_quant,
        dtype=options.dtype,
        batch=options.batch,
        seq_len=options.seq_len,
        scored=options.scored,
        logits=options.logits,
        attention=options.attention,
        gradient_checkpointing=options.gradient_checkpointing,
        device=options.device,
        chunk_size=options.chunk_size,
        threads=options.threads,
    )


def run(options: argparse.Namespace) -> int:
    try:
        plan = plan_memory(request_from_options(options))
    except PlanError as error:
        print(f"zo plan: error: {error}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(f"{plan.parameters / 1e9:.3f} B parameters, {plan.trainable_parameters:,} trainable")
        print(plan.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zo plan", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
