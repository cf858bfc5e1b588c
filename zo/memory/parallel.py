"""Memory predictions beyond one device: sharded over N ranks (FSDP2) and offloaded blocks.

Built on :func:`zo.memory.step.plan_memory` (the one-device plan), changing only what sharding or
offloading changes, as :mod:`zo.sharded` and :mod:`zo.offload` lay memory out:

* **sharded**: each rank keeps its rows of every decoder-block tensor (``ceil(rows / N)``,
  torch.chunk's split) and the embeddings, final norm and head whole. A perturbed forward
  adds, at its worst moment, one gathered layer (FSDP's all-gather output) plus two copies
  of that layer's shard (FSDP's copy-in buffer, and the saved shard the perturbation is
  written over). Activations, logits and direction scratch are the one-device plan's.
* **offloaded**: the blocks live in host memory; the device holds the embeddings, norm and
  head, the one-device transients, and ``k + 1`` slots of one block each (``prefetch`` k:
  the computing block and the k being copied). Loading puts no more there (the model loads
  on the host, and only what is outside the blocks moves), so the training step is the
  peak. The host holds the blocks plus the perturbed copies of the k blocks in flight.

Sharded plans cover every estimator ``train.parallel=fsdp`` runs over a full trainable set:
per-element state (ZO-Adam's moments, momentum; AdamW's) and gradients are sharded like the
weights, and a first-order step adds the gathered layer's unsharded gradient before FSDP
reduce-scatters it. Offloaded plans cover ZO-SGD only (what that mode runs).
"""

from __future__ import annotations

from dataclasses import dataclass

from zo.memory.estimator import EstimatorMemory
from zo.memory.shapes import PlanError
from zo.memory.step import DTYPE_BYTES, Plan, PlanRequest, parse_trainable, plan_memory


@dataclass(frozen=True)
class ParallelPlan:
    """Peak bytes per device for one way of running ``request``; ``host`` where it matters."""

    mode: str
    devices: int
    device_peak: int
    """Allocator peak on each device (rank), plus the framework overhead."""
    resident: int = 0
    """Weights each device keeps between forwards."""
    host_bytes: int = 0
    """Offload: host memory the streamed blocks occupy."""

    def fits(self, device_memory: int) -> bool:
        return self.device_peak <= device_memory


def _split(plan: Plan) -> tuple[int, int, int, int]:
    """(block parameters, other parameters, one layer's parameters, largest layer matrix)."""
    shape = plan.shape
    layer = sum(r * c for r, c in shape.layer_matrices()) + shape.block_vectors
    largest = max(r * c for r, c in shape.layer_matrices())
    return shape.layers * layer, shape.outer_parameters, layer, largest


def _check(request: PlanRequest) -> None:
    stateless_zo = request.estimator.memory == EstimatorMemory()  # ZO-SGD's memory
    if not stateless_zo or request.trainable != "full" or request.quant != "none":
        raise PlanError(
            "offloaded plans cover a zeroth-order estimator without per-element state "
            "(ZO-SGD) over trainable full without quantization (what train.parallel=offload "
            "runs today)"
        )


SHARDED_PLAN_TRAINABLES = ("full", "lora", "mask")
"""Trainable kinds a sharded plan covers: the base's block rows are sharded the same way for
each (LoRA adapters and mask deltas live in the blocks and shard with them). ``names`` is
left out: its per-element state need not split with the weights."""


def _check_sharded(request: PlanRequest) -> None:
    memory = request.estimator.memory
    shardable = memory.gradients in ("none", "all", "one") and not (
        memory.tangents or memory.kept_hidden_states
    )
    kind = parse_trainable(request.trainable, request.lora_r).kind
    if not shardable or kind not in SHARDED_PLAN_TRAINABLES or request.quant != "none":
        raise PlanError(
            "sharded plans cover the estimators train.parallel=fsdp runs (ZO-SGD and its "
            "per-element variants, ZO-Adam, sgd, adamw, lomo) over trainable "
            f"{', '.join(SHARDED_PLAN_TRAINABLES)} without quantization"
        )


def plan_sharded(request: PlanRequest, ranks: int) -> ParallelPlan:
    """Per-rank peak of ``train.parallel=fsdp`` over ``ranks`` processes."""
    _check_sharded(request)
    if ranks < 1:
        raise PlanError(f"ranks must be >= 1, got {ranks}")
    one = plan_memory(request)
    wb = DTYPE_BYTES[request.dtype]
    blocks, rest, layer, _ = _split(one)
    local = -(-blocks // ranks) + rest
    fraction = local / (blocks + rest)  # of any per-element tensor over the trainable set
    state = one.component("optimizer state")
    transient = one.peak_allocated - one.component("dense weights") - state
    if one.peak_phase == "optimizer step":  # every gradient (and the step's temporaries)
        transient = round(transient * fraction)
    resident = local * wb
    gathered = layer * wb + 2 * (-(-layer // ranks)) * wb
    if request.estimator.memory.backward:
        # the gathered layer's gradient before its reduce-scatter, plus the one reduce-scatter
        # input FSDP2 keeps in flight (the blocks share one communication context:
        # zo.sharded.shard_model)
        gathered += 2 * layer * wb
    peak = resident + round(state * fraction) + transient + gathered + one.overhead.bytes
    return ParallelPlan("fsdp", ranks, peak, resident=resident)


def plan_offloaded(request: PlanRequest, prefetch: int = 1) -> ParallelPlan:
    """Device peak and host bytes of ``train.parallel=offload`` (``train.offload_prefetch``)."""
    _check(request)
    if prefetch < 1:
        raise PlanError(f"prefetch must be >= 1, got {prefetch}")
    one = plan_memory(request)
    wb = DTYPE_BYTES[request.dtype]
    blocks, rest, layer, _ = _split(one)
    transient = one.peak_allocated - one.component("dense weights")
    slots = min(prefetch + 1, one.shape.layers) * layer  # allocated once, reused per block
    peak = rest * wb + transient + slots * wb + one.overhead.bytes
    host = blocks + min(prefetch, one.shape.layers) * layer
    return ParallelPlan("offload", 1, peak, rest * wb, host_bytes=host * wb)


def parallel_plans(request: PlanRequest, gpus: int) -> dict[str, ParallelPlan | PlanError]:
    """Sharded over ``gpus`` and offloaded, each planned on its own: a mode that does not run
    ``request`` gives its own refusal, never the other mode's."""
    return {
        "fsdp": _plan_or_refusal(plan_sharded, request, gpus),
        "offload": _plan_or_refusal(plan_offloaded, request),
    }


def _plan_or_refusal(plan, *args) -> ParallelPlan | PlanError:
    try:
        return plan(*args)
    except PlanError as refusal:
        return refusal


def what_fits(request: PlanRequest, gpus: int, gpu_memory: int) -> dict[str, bool | None]:
    """Which of one device, sharded over ``gpus``, and offloaded fits in ``gpu_memory``
    (None: that mode does not run this request)."""
    one = plan_memory(request)
    plans = parallel_plans(request, gpus)
    verdict = {"single": one.process_total <= gpu_memory}
    for mode, label in (("fsdp", f"fsdp x{gpus}"), ("offload", "offload")):
        plan = plans[mode]
        verdict[label] = None if isinstance(plan, PlanError) else plan.fits(gpu_memory)
    return verdict
