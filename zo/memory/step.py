"""The peak memory of one training step, component by component, before any model loads.

What the numbers mean:

* **peak (allocator)** is what ``torch.cuda.max_memory_allocated`` reports on CUDA, and the
  peak of live tensor bytes on CPU (what torch's profiler counts with ``profile_memory``):
  the weights and state that stay resident plus the largest transient of the step.
* **framework overhead** sits outside the allocator: the CUDA context (cuBLAS/cuDNN
  handles and kernels, a few hundred MiB, never in ``max_memory_allocated``), or on CPU the
  process's runtime (Python, torch, transformers), which peak RSS includes. It is added only
  to **process total**, and is a measured constant, not derived from the model.

The model is a :class:`~zo.memory.shapes.ModelShape`; the estimator a
:class:`~zo.memory.estimator.PlannedEstimator` (its registered memory trait); the engine's
chunking and offload thresholds are an :class:`~zo.engine.EngineConfig`, as the run uses it.
The activation model counts the tensors alive at the worst moment of each phase (embedding,
one block, head). ``experiments/plan_check.py`` checks predictions against measured peaks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from zo.config import DEFAULT_LORA_TARGETS, ModelConfig, TaskConfig, TrainableConfig, TrainConfig
from zo.engine import ACCELERATOR_CHUNK, CPU_CHUNK, EngineConfig, resolve_generator
from zo.engine_config import ACCELERATOR_BUCKET, CPU_BUCKET, LEGACY_GENERATOR
from zo.memory.estimator import PlannedEstimator
from zo.memory.shapes import ModelShape, PlanError
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


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """One training step to plan. Defaults are ``zo train``'s (:mod:`zo.config`)."""

    shape: ModelShape
    estimator: PlannedEstimator
    model: str = ""
    """The model's name, for the echo."""
    trainable: str = "full"
    """``full``, ``lora`` / ``lora:TARGETS`` (as in ``zo train``: target modules, rank in
    ``lora_r``) or ``mask:DENSITY``."""
    lora_r: int = TrainableConfig.lora_r
    quant: str = ModelConfig.quant
    """``none`` or ``nf4`` (the blocks' linear layers in 4 bits, the rest in ``dtype``)."""
    dtype: str = ModelConfig.dtype
    """Dtype of the (non-4-bit) weights, and the NF4 compute dtype (as ``zo train``)."""
    compute_dtype: str | None = None
    """NF4 compute dtype, when it differs from ``dtype`` (None: ``dtype``)."""
    double_quant: bool = True
    """NF4 absmax quantized again to 8 bits, as :mod:`zo.quant` loads 4-bit models."""
    batch: int = TrainConfig.batch_size
    """Sequences per micro-batch (candidates count as sequences)."""
    seq_len: int = TaskConfig.max_length
    scored: int = 1
    """Positions scored per sequence (logits only there); ignored with ``logits='full'``."""
    logits: str = "scored"
    """``scored`` (this project) or ``full`` (a sequence x vocabulary forward, as HF's loss)."""
    attention: str = "sdpa"
    """``eager`` materialises batch x heads x seq x seq scores; ``sdpa`` a fused kernel."""
    gradient_checkpointing: bool = TrainConfig.gradient_checkpointing
    device: str = "cuda"
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def activation_dtype(self) -> str:
        return (self.compute_dtype or self.dtype) if self.quant == "nf4" else self.dtype


@dataclass(frozen=True)
class TrainableSpec:
    kind: str
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ()
    density: float = 0.0
    patterns: tuple[str, ...] = ()

    @property
    def dense(self) -> bool:
        """Trains the model's own weights, in their dtype (``full``, ``names``)."""
        return self.kind in ("full", "names")


def parse_trainable(text: str, lora_r: int = TrainableConfig.lora_r) -> TrainableSpec:
    """``full``, ``lora`` / ``lora:q_proj,v_proj`` (target modules, as ``zo train`` reads
    it), ``mask:DENSITY``."""
    kind, _, value = text.partition(":")
    if kind == "full" and not value:
        return TrainableSpec("full")
    if kind == "names" and value:
        return TrainableSpec("names", patterns=tuple(p for p in value.split(",") if p))
    if kind == "lora":
        targets = tuple(t for t in value.split(",") if t) or DEFAULT_LORA_TARGETS
        if any(t.isdigit() for t in targets):
            raise PlanError(
                f"trainable {text!r}: as in zo train, lora:X names target modules "
                f"(lora:q_proj,v_proj); give the rank with --lora-r {targets[0]} "
                f"(zo train: trainable.lora_r={targets[0]})"
            )
        if lora_r < 1:
            raise PlanError(f"the LoRA rank must be >= 1, got {lora_r}")
        return TrainableSpec("lora", lora_r=lora_r, lora_targets=targets)
    if kind == "mask":
        try:
            density = float(value or 0.001)
        except ValueError:
            density = -1.0
        if 0.0 < density <= 1.0:
            return TrainableSpec("mask", density=density)
    raise PlanError(
        f"trainable {text!r} is not understood; use full, names:PATTERNS, lora or "
        "lora:TARGETS (rank: --lora-r), mask:DENSITY (0 < DENSITY <= 1, e.g. mask:0.001) "
        "or mask:PATH"
    )


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
    components: list[Component]
    """Resident parts (weights, states) and the transients of the peak phase."""
    peak_phase: str
    peak_allocated: int
    overhead: Component
    parameters: int
    trainable_parameters: int

    @property
    def shape(self) -> ModelShape:
        return self.request.shape

    @property
    def process_total(self) -> int:
        return self.peak_allocated + self.overhead.bytes

    def component(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)

    def to_dict(self) -> dict:
        request = asdict(self.request)
        request["estimator"] = self.request.estimator.name
        request["estimator_memory"] = asdict(self.request.estimator.memory)
        return {
            "request": request,
            "parameters": self.parameters,
            "trainable_parameters": self.trainable_parameters,
            "components": {c.name: c.bytes for c in self.components},
            "component_notes": {c.name: c.note for c in self.components if c.note},
            "peak_phase": self.peak_phase,
            "peak_allocated_bytes": self.peak_allocated,
            "overhead": {"name": self.overhead.name, "bytes": self.overhead.bytes},
            "process_total_bytes": self.process_total,
        }


@dataclass(frozen=True)
class _Run:
    """The request resolved to numbers: sizes in elements, dtypes in bytes."""

    shape: ModelShape
    request: PlanRequest
    trainable: TrainableSpec
    weight_bytes: int
    act_bytes: int
    tokens: int
    scored_rows: int
    trainable_elements: int = 0

    @property
    def memory(self):
        return self.request.estimator.memory

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
        elif not self.memory.backward and self.trainable.dense:
            weight = self.perturbed_copy_elements(rows * cols) * self.weight_bytes
        else:
            weight = 0
        if self.trainable.kind != "mask":
            return weight
        per_token = forward_bytes_per_token(
            self.mask_entries(rows, cols), rows, *[self.act_bytes] * 2
        )
        tokens = self.tokens
        if not self.memory.tangents:  # forward AD takes the whole block at once
            tokens = min(tokens, chunk_tokens(per_token))
        return max(weight, tokens * per_token)

    def perturbed_copy_elements(self, weight: int) -> int:
        """Elements of perturbed copies alive while a layer with a ``weight``-element trainable
        weight runs: the engine's bucket holding it (a run of trainable tensors of up to
        ``bucket_size`` elements, or the one larger tensor), and the next bucket when it is
        drawn ahead (``engine.prefetch``). Engine version 1 copied one weight per call."""
        engine = self.request.engine
        if engine.generator == LEGACY_GENERATOR:
            return weight
        cuda = self.request.device == "cuda"
        bucket = min(
            engine.bucket_size or (ACCELERATOR_BUCKET if cuda else CPU_BUCKET),
            self.trainable_elements,
        )
        prefetch = engine.prefetch == "on" or (engine.prefetch == "auto" and cuda)
        return max(weight, bucket) + (bucket if prefetch else 0)

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
        limit, engine = self.request.engine.offload_max_rows, self.request.engine
        return numel > engine.offload_threshold and (limit < 0 or rows <= limit)


def _validate(request: PlanRequest) -> TrainableSpec:
    choices = {
        "device": (request.device, ("cpu", "cuda")),
        "quant": (request.quant, ("none", "nf4")),
        "logits": (request.logits, ("scored", "full")),
        "attention": (request.attention, ("eager", "sdpa")),
        "dtype": (request.dtype, tuple(DTYPE_BYTES)),
        "compute_dtype": (request.activation_dtype, tuple(DTYPE_BYTES)),
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
    shape = request.shape
    if min(shape.hidden, shape.layers, shape.intermediate, shape.heads, shape.vocab) < 1:
        raise PlanError("hidden, layers, intermediate, heads and vocab must all be >= 1")
    if shape.kv_heads < 1 or shape.heads % shape.kv_heads:
        raise PlanError(f"heads ({shape.heads}) must be a multiple of kv_heads ({shape.kv_heads})")
    spec = parse_trainable(request.trainable, request.lora_r)
    if request.quant == "nf4" and spec.kind == "full":
        raise PlanError(
            "a 4-bit base is frozen: --trainable full is impossible with --quant nf4; "
            "train a mask (mask:0.001) or LoRA (lora) over it"
        )
    estimator = request.estimator
    if estimator.eager_attention and request.attention != "eager":
        raise PlanError(
            f"estimator {estimator.name} needs eager attention (registered with "
            "eager_attention: torch.func.jvp fails through fused kernels): --attention eager"
        )
    if spec.kind == "lora" and not _lora_matrices(shape, spec):
        names = sorted({m.name.rsplit(".", 1)[-1] for m in shape.matrices})
        raise PlanError(
            f"LoRA targets {list(spec.lora_targets)} match no linear layer of "
            f"{shape.model_type}; its layers are {names} (lora:NAME,NAME)"
        )
    return spec


def _lora_matrices(shape: ModelShape, spec: TrainableSpec) -> list[tuple[int, int]]:
    """The block matrices peft's ``target_modules`` picks (a name, or its last parts)."""
    return [
        (m.rows, m.cols)
        for m in shape.matrices
        if any(m.name == t or m.name.endswith("." + t) for t in spec.lora_targets)
    ]


def _trainable_tensors(shape: ModelShape, spec: TrainableSpec) -> list[int]:
    """Element counts of the trainable tensors (tied weights once)."""
    if spec.kind == "full":
        matrices = [m.numel for m in shape.matrices] * shape.layers
        rest = shape.parameters() - sum(matrices)
        big = [shape.vocab * shape.hidden] * (1 if shape.tied_embeddings else 2)
        return matrices + big + [rest - sum(big)]
    if spec.kind == "names":  # fnmatch over parameter names, as zo train's selector
        from fnmatch import fnmatchcase

        sizes = [
            numel
            for name, numel in shape.parameter_names
            if any(fnmatchcase(name, pattern) for pattern in spec.patterns)
        ]
        if not sizes:
            examples = ", ".join(name for name, _ in shape.parameter_names[:4])
            raise PlanError(
                f"trainable names {list(spec.patterns)} match no parameter; names look "
                f"like: {examples}"
            )
        return sizes
    if spec.kind == "lora":  # A (r x in) and B (out x r) per targeted matrix
        r = spec.lora_r
        per_block = [n for rows, cols in _lora_matrices(shape, spec) for n in (r * cols, rows * r)]
        return per_block * shape.layers
    return [round(spec.density * m.numel) for m in shape.matrices] * shape.layers


def _forward_phases(run: _Run) -> dict[str, int]:
    """Bytes alive (besides resident weights and state) at the worst moment of each phase
    of one forward pass without grad."""
    shape, request, s = run.shape, run.request, run.act_bytes
    profile, h, i, n = shape.activations, shape.hidden, shape.intermediate, run.tokens
    batch, seq, heads = request.batch, request.seq_len, shape.heads
    mask = batch * seq * seq * (s if run.eager else 1)
    rope = 2 * batch * seq * shape.head_dim * s if profile.rope else 0
    attention_weight = max(
        (run.linear_temp_bytes(m.rows, m.cols) for m in shape.matrices if m.in_attention),
        default=0,
    )
    mlp_weight = max(
        (run.linear_temp_bytes(m.rows, m.cols) for m in shape.matrices if not m.in_attention),
        default=0,
    )

    qkv = n * (shape.q_width + 2 * shape.kv_width) * s
    repeat = 2 * n * shape.q_width * s if shape.kv_heads < heads and run.eager else 0
    scores = batch * heads * seq * seq * 8 if run.eager else n * h * s  # score + softmax
    rope_temps = 3 * n * h * s if rope else 0
    lora = n * h * s if run.trainable.kind == "lora" else 0
    attention = 2 * n * h * s + qkv + repeat + lora + max(scores, attention_weight, rope_temps)
    # the layer keeps eager attention's probabilities (returned, unused) through its MLP
    probabilities = batch * heads * seq * seq * s if run.eager else 0
    live_i = profile.inference_mlp_i
    mlp = profile.inference_mlp_h * n * h * s + probabilities
    mlp += max(live_i * n * i * s, (live_i - 1) * n * i * s + mlp_weight)
    held = profile.held_embeddings * n * h * s
    layer = mask + rope + held + max(attention, mlp)

    embed = n * h * s * (3 if profile.rope else 1)
    vocab_numel = shape.vocab * shape.hidden
    zo_full = not run.memory.backward and not run.memory.tangents and run.trainable.dense
    if zo_full:  # a perturbed copy, or the output-side perturbation's fp32 rows
        output_side = n * h * 4 * (2 if request.device == "cuda" else 1)
        embed += output_side if run.offloaded(vocab_numel, 0) else vocab_numel * s
    head = 2 * n * h * s + run.scored_rows * h * s + _logits_bytes(run)
    if zo_full and not run.offloaded(vocab_numel, run.scored_rows):
        head += vocab_numel * run.weight_bytes
    phases = {"embedding": embed + mask + rope, "decoder layer": layer, "head": head}
    if not run.memory.tangents:
        return phases
    # every activation carries a tangent; each trainable weight read gets its direction
    # drawn in fp32 (and cast to the weight's dtype) for the call that reads it
    phases = {name: 2 * count for name, count in phases.items()}
    if run.trainable.dense:
        direction = 4 + (run.weight_bytes if run.weight_bytes < 4 else 0)
        phases["embedding"] += vocab_numel * direction
        phases["decoder layer"] += max(m.numel for m in shape.matrices) * direction
        phases["head"] += vocab_numel * direction
    return phases


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
    profile, n = shape.activations, run.tokens
    scores = request.batch * shape.heads * request.seq_len**2 * (4 + (s if s < 4 else 0))
    stored_h, stored_i = profile.stored_h, profile.stored_i
    if not run.trainable.dense:  # norms frozen; LoRA also freezes most linear layers
        stored_h -= profile.norm_weight_inputs_h
    if run.trainable.kind == "lora":
        stored_h, stored_i = stored_h - profile.linear_only_h, stored_i - profile.linear_only_i
    attention = 4 * shape.q_width  # q, k and v repeated to the query heads, the output
    if profile.head_norms and profile.rms_norm and run.trainable.dense:
        attention += shape.q_width + shape.kv_width  # q/k norms' normalised inputs
    widths = stored_h * shape.hidden + stored_i * shape.intermediate + attention
    per_layer = widths * n * s
    per_layer += scores if run.eager else 0
    if profile.rms_norm and s < 4:  # RMSNorm saves its fp32 upcast of the input
        per_layer += profile.hidden_norms * n * shape.hidden * 4
    if request.gradient_checkpointing:  # layer inputs, plus one layer recomputed in backward
        layers = shape.layers * n * shape.hidden * s + per_layer
    else:
        layers = shape.layers * per_layer
    embeddings = profile.stored_embeddings * n * shape.hidden * s
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


def _direction_chunk(run: _Run, largest: int) -> tuple[int, str]:
    """The engine's per-draw scratch, per thread: a chunk, an accumulator for estimators that
    rebuild g_hat by chunks, an fp32 copy for low-precision weights. None for ZO-SGD's fused
    passes under philox-ieee on CPU (``auto``'s choice there) but an output-side head's chunk."""
    engine, device = run.request.engine, run.request.device
    chunk = min(engine.chunk_size or (CPU_CHUNK if device == "cpu" else ACCELERATOR_CHUNK), largest)
    threads = 1 if device == "cuda" else engine.threads or min(8, _intra_op_threads())
    fused = device == "cpu" and resolve_generator(engine, device) == "philox-ieee"
    if fused and run.weight_bytes == 4 and not (run.memory.accumulator or run.memory.state_copies):
        head = run.offloaded(run.shape.vocab * run.shape.hidden, run.scored_rows)
        return chunk * 4 * int(head), "fused passes; one chunk for an output-side head"
    copies = 1 + run.memory.accumulator + (run.trainable.dense and run.weight_bytes < 4)
    return chunk * 4 * threads * copies, f"{chunk} fp32 x {copies} x {threads} thread(s)"


def plan_memory(request: PlanRequest) -> Plan:
    """Predict the peak memory of one training step of ``request``, per component."""
    spec = _validate(request)
    shape, memory = request.shape, request.estimator.memory
    wb = DTYPE_BYTES[request.dtype]
    act = DTYPE_BYTES[request.activation_dtype]
    tokens = request.batch * request.seq_len
    scored_rows = tokens if request.logits == "full" else request.batch * request.scored
    tensors = _trainable_tensors(shape, spec)
    trainable = sum(tensors)
    run = _Run(shape, request, spec, wb, act, tokens, scored_rows, trainable)
    parameters = shape.parameters()
    trainable_bytes = wb if spec.dense else 4

    components = _resident_weights(request, shape, spec, trainable, wb)
    state_bytes = trainable_bytes if memory.backward else 4
    state = memory.state_copies * trainable * state_bytes
    if state:
        components.append(Component("optimizer state", state, f"{memory.state_copies} copies"))

    phases = _forward_phases(run)
    if not memory.backward:
        scratch, scratch_note = _direction_chunk(run, max(tensors))
        peak_phase = max(phases, key=phases.__getitem__)
        components += [
            Component("activations", phases["decoder layer"], "one decoder layer at a time"),
            Component("logits", _logits_bytes(run), f"{scored_rows} rows x vocab"),
            Component("direction chunk", scratch, scratch_note),
        ]
        kept = memory.kept_hidden_states * run.tokens * shape.hidden * run.act_bytes
        if kept:
            note = f"{memory.kept_hidden_states} x tokens x hidden, reused forwards"
            components.append(Component("kept hidden states", kept, note))
        transient = phases[peak_phase] + scratch + kept
        peak_phase = f"forward, {peak_phase}"
    else:
        stored = _stored_activations(run)
        largest = max(tensors) * trainable_bytes
        every = memory.gradients in ("all", "part")  # part: bounded by the whole set
        grads = trainable * trainable_bytes if every else largest
        if memory.gradients == "one" and trainable_bytes < 4:  # LOMO updates in fp32
            largest += max(tensors) * 4
        step_temp = 0
        if every and memory.state_copies:
            step_temp = trainable * trainable_bytes if request.device == "cuda" else 2 * largest
        candidates = {
            "forward end": stored + _logits_bytes(run),
            "backward": stored + largest + _backward_transient(run),
            "optimizer step": grads + step_temp,
        }
        peak_phase = max(candidates, key=candidates.__getitem__)
        components += [
            Component("activations", stored, "stored for backward"),
            Component("logits", _logits_bytes(run), f"{scored_rows} rows x vocab"),
            Component("gradients", grads, "all" if every else "largest"),
        ]
        transient = candidates[peak_phase]

    if request.device == "cuda":
        handles = 2 if memory.backward else 1
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
        components=components,
        peak_phase=peak_phase,
        peak_allocated=resident + transient,
        overhead=overhead,
        parameters=parameters,
        trainable_parameters=trainable,
    )


def _resident_weights(
    request: PlanRequest, shape: ModelShape, spec: TrainableSpec, trainable: int, wb: int
) -> list[Component]:
    """The weights (dense, or 4-bit with their quant states) and the trainable extras."""
    components: list[Component] = []
    if request.quant == "nf4":
        packed = states = 0
        for rows, cols in shape.layer_matrices():
            weight, state = nf4_bytes(rows * cols, request.double_quant)
            packed, states = packed + weight, states + state
        dense = (shape.parameters() - shape.layer_matrix_parameters()) * wb
        quant_note = "double-quantized" if request.double_quant else "fp32"
        components += [
            Component("4-bit weights", shape.layers * packed, "NF4, 0.5 byte/param"),
            Component("quant states", shape.layers * states, f"absmax per 64-block, {quant_note}"),
            Component("dense weights", dense, f"embeddings, head, norms, biases ({wb} B)"),
        ]
    else:
        components.append(Component("dense weights", shape.parameters() * wb, f"{wb} B/param"))
    if spec.kind == "mask":
        components += [
            Component("trainable values", trainable * 4, f"fp32, density {spec.density:g}"),
            Component("mask indices", trainable * 12, "int32: flat index, row, column"),
        ]
    elif spec.kind == "lora":
        targets = ",".join(spec.lora_targets)
        components.append(
            Component("trainable values", trainable * 4, f"LoRA r={spec.lora_r} on {targets}")
        )
    return components


TRANSIENT = {
    "activations",
    "logits",
    "direction chunk",
    "gradients",
    "cuBLAS workspace",
    "kept hidden states",
}


def _intra_op_threads() -> int:
    import torch

    return torch.get_num_threads()
