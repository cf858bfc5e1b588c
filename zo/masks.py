"""Sensitive-parameter masks: which entries of which weight matrices sparse ZO trains.

A mask maps weight names to sorted flat ``int32`` indices. Selections (:data:`SELECTIONS`):

- ``sensitive`` (SensZOQ): the global top-k entries, over every targeted matrix together, of
  the squared gradients of the causal-LM loss summed over calibration batches,
  ``score = sum_b grad_b ** 2`` (a diagonal empirical Fisher); ``k = density * numel``.
- ``per_matrix``: the same score, top ``density * numel`` in each matrix.
- ``magnitude``: top ``|W|`` in each matrix. ``random``: a seeded uniform draw in each matrix.

**Memory.** Gradients never exist for the whole model: a
``register_post_accumulate_grad_hook`` on each targeted weight squares its gradient as soon
as it is complete, keeps what it needs, and frees ``.grad`` (as LOMO does), so a mask costs
about a LOMO backward, not a full-gradient copy.

**Exactness.** Keeping running per-batch top-k candidates alone is *not* exact for a sum over
batches: an entry may be second-best in every batch and best overall. Exact top-k of the sum
without a full-size accumulator is done in (at most) two passes over the calibration data:

1. Each batch keeps its top ``pool_factor * k`` squared gradients (per selection group, i.e.
   globally or per matrix) and, per matrix, the batch threshold ``T_b`` (smallest kept value)
   and the matrix's largest squared gradient ``max_b``. Every entry never kept scores at most
   ``bound_m = sum_b min(T_b, max_b)``. Candidates' partial sums give a lower bound
   ``lam`` on the k-th largest score. A matrix with ``bound_m < lam`` is *certified*: none of
   its non-candidates can be in the top k.
2. The batches are run again; hooks gather exact sums at the candidates of certified matrices
   and, for the matrices that were not certified, accumulate the full ``sum_b grad_b ** 2``
   (the fallback costs full-gradient memory for those matrices only; the summary reports it).

With one batch (all calibration tokens in one backward) pass 1 alone is exact. The result
equals a dense ``topk`` of the fp32 sums in batch order, up to ties at the k-th value (float
addition is monotone, so the bounds hold for the rounded sums too). Pass 2 recomputes the
gradients, which must be bit-identical to pass 1's: true on CPU; on GPU, non-deterministic
kernels perturb them by rounding, which can only swap entries within rounding of the k-th.

Memory beyond a LOMO backward: one squared gradient at a time, the pools, the candidate
union (at most ``batches * pool_factor * k`` entries of 12 bytes; overlap between batches
makes it smaller) and the dense sums of uncertified matrices. Prefer few, large batches; a
larger ``pool_factor`` certifies more matrices at the price of bigger pools.
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from zo.blocks import decoder_blocks
from zo.engine import mix_seed

FORMAT_VERSION = "1"


class MaskError(ValueError):
    """A mask that does not fit its model, or a mask file that cannot be read."""


# --- targets ----------------------------------------------------------------------------------


def mask_targets(
    model: nn.Module, include_embeddings: bool = False
) -> list[tuple[str, nn.Parameter]]:
    """Every ``nn.Linear`` weight inside the decoder blocks (plus the embeddings/LM head).

    Names are the model's ``named_parameters`` names; a tied head appears once, under the
    embedding's name.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    chosen: list[nn.Parameter] = [
        module.weight
        for block in decoder_blocks(model)
        for module in block.modules()
        if isinstance(module, nn.Linear)
    ]
    if include_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                chosen.append(module.weight)
    unique = list({id(p): p for p in chosen}.values())
    return [(names[id(p)], p) for p in unique]


def weight_numel(weight: torch.Tensor) -> int:
    """Entries of the matrix a weight stands for: a 4-bit ``Params4bit`` packs two per byte
    and keeps the original shape in its quantization state."""
    state = getattr(weight, "quant_state", None)
    return math.prod(state.shape) if state is not None else weight.numel()


def budget(density: float, numel: int) -> int:
    """Entries to keep out of ``numel``: ``round(density * numel)``, at least one."""
    if not 0.0 < density <= 1.0:
        raise MaskError(f"density must be in (0, 1], e.g. 0.001 for 0.1% (got {density})")
    return min(numel, max(1, round(density * numel)))


# --- exact top-k of summed squared gradients, inside backward hooks ----------------------------


@dataclass
class SensitivityStats:
    passes: int = 0
    batches: int = 0
    candidates: int = 0
    """Distinct entries kept by some batch in pass 1."""
    certified_matrices: int = 0
    fallback_numel: int = 0
    """Entries of uncertified matrices that pass 2 accumulated densely."""


@dataclass
class _Layout:
    """Targets in a global flat key space (``key = offset[m] + flat index``), and groups."""

    names: list[str]
    params: list[nn.Parameter]
    group_of: list[int]
    group_k: list[int]
    offsets: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        sizes = torch.tensor([0] + [p.numel() for p in self.params], dtype=torch.long)
        self.offsets = sizes.cumsum(0)

    def start(self, m: int) -> int:
        return int(self.offsets[m])

    def members(self, group: int) -> list[int]:
        return [m for m, g in enumerate(self.group_of) if g == group]

    def target_of(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.offsets.to(keys.device), keys, right=True) - 1


def _squared_grad(param: nn.Parameter) -> torch.Tensor:
    """``grad ** 2`` in fp32, flat; frees ``.grad`` (in place when it is already fp32)."""
    squared = param.grad.detach().float().reshape(-1)
    param.grad = None
    return squared.square_()


def _run_backwards(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    params: Sequence[nn.Parameter],
    on_grad: Callable[[int, int, torch.Tensor], None],
) -> None:
    """One backward per batch; ``on_grad(batch, target, grad**2)`` as each gradient completes."""
    current = [0]

    def hook_for(index: int):
        def hook(param: nn.Parameter) -> None:
            on_grad(current[0], index, _squared_grad(param))

        return hook

    handles = [p.register_post_accumulate_grad_hook(hook_for(i)) for i, p in enumerate(params)]
    try:
        for b, ids in enumerate(batches):
            current[0] = b
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        for handle in handles:
            handle.remove()


def _top(values: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if values.numel() <= k:
        return values, keys
    kept, where = torch.topk(values, k, sorted=False)
    return kept, keys[where]


def squared_gradient_topk(
    model: nn.Module,
    layout: _Layout,
    batches: Sequence[torch.Tensor],
    pool_factor: int = 4,
) -> tuple[dict[str, torch.Tensor], SensitivityStats]:
    """Exact top-``k`` per group of ``sum_b grad_b**2`` (see the module docstring)."""
    targets = len(layout.params)
    groups = len(layout.group_k)
    group_numel = [sum(layout.params[m].numel() for m in layout.members(g)) for g in range(groups)]
    caps = [min(n, pool_factor * k) for n, k in zip(group_numel, layout.group_k, strict=True)]
    device = layout.params[0].device
    stats = SensitivityStats(batches=len(batches), passes=1)

    # pass 1: per-batch pools -> candidate union with partial sums, per-matrix bounds
    bound = torch.zeros(targets, dtype=torch.float32)
    keys = torch.empty(0, dtype=torch.long, device=device)
    partial = torch.empty(0, dtype=torch.float32, device=device)
    pools: list[tuple[torch.Tensor, torch.Tensor]] = []
    batch_max = torch.zeros(targets, dtype=torch.float32)

    def collect(_batch: int, m: int, squared: torch.Tensor) -> None:
        g = layout.group_of[m]
        batch_max[m] = squared.max().item()
        vals, where = torch.topk(squared, min(caps[g], squared.numel()), sorted=False)
        pool_vals, pool_keys = pools[g]
        pools[g] = _top(
            torch.cat([pool_vals, vals]), torch.cat([pool_keys, where + layout.start(m)]), caps[g]
        )

    for ids in batches:
        empty = (torch.empty(0, device=device), torch.empty(0, dtype=torch.long, device=device))
        pools[:] = [empty] * groups
        batch_max.zero_()
        _run_backwards(model, [ids], layout.params, collect)
        # Entries outside a full pool are <= its smallest value; a pool that is not full holds
        # every nonzero entry (a matrix without a gradient this batch contributes zeros).
        thresholds = torch.tensor(
            [float(v.min()) if v.numel() == caps[g] else 0.0 for g, (v, _) in enumerate(pools)],
            dtype=torch.float32,
        )
        bound.add_(torch.minimum(thresholds[layout.group_of], batch_max))
        keys, inverse = torch.unique(torch.cat([keys, *(k for _, k in pools)]), return_inverse=True)
        # each key gets at most two terms (its old partial sum, this batch's value): exact order
        sums = torch.zeros(keys.numel(), dtype=torch.float32, device=device)
        partial = sums.index_add_(0, inverse, torch.cat([partial, *(v for v, _ in pools)]))
    stats.candidates = keys.numel()
    owner = layout.target_of(keys)
    candidates = {
        m: (partial[owner == m], keys[owner == m] - layout.start(m)) for m in range(targets)
    }

    if len(batches) == 1:  # the pools held exact scores: their top k is the answer
        stats.certified_matrices = targets
        return _select(layout, candidates), stats

    # certification: lam[g] <= the true k-th largest score of group g
    lam = torch.zeros(groups, dtype=torch.float32)
    for g in range(groups):
        in_group = torch.cat([candidates[m][0] for m in layout.members(g)])
        if in_group.numel() >= layout.group_k[g]:
            lam[g] = torch.topk(in_group, layout.group_k[g]).values[-1].item()
    certified = (bound < lam[layout.group_of]).tolist()
    stats.certified_matrices = sum(certified)
    stats.fallback_numel = sum(
        p.numel() for p, ok in zip(layout.params, certified, strict=True) if not ok
    )

    # pass 2: exact sums at the candidates of certified matrices, dense sums for the rest
    local = {m: candidates[m][1] for m in range(targets) if certified[m]}
    del candidates, keys, partial, owner
    sums = {
        m: torch.zeros(
            local[m].numel() if m in local else layout.params[m].numel(),
            dtype=torch.float32,
            device=device,
        )
        for m in range(targets)
    }

    def accumulate(_batch: int, m: int, squared: torch.Tensor) -> None:
        sums[m].add_(squared[local[m]] if m in local else squared)

    _run_backwards(model, batches, layout.params, accumulate)
    stats.passes = 2
    return _select(layout, {m: (sums[m], local.get(m)) for m in range(targets)}), stats


def _select(
    layout: _Layout, scores: dict[int, tuple[torch.Tensor, torch.Tensor | None]]
) -> dict[str, torch.Tensor]:
    """Top ``k`` per group; ``scores[m]`` = (values, their flat indices or None for all)."""
    pooled: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layout.group_k]
    for m, (values, local) in scores.items():
        g = layout.group_of[m]
        # a matrix's own top k first: exact for the group's top k, and keeps merging small
        kept, where = torch.topk(values, min(layout.group_k[g], values.numel()), sorted=False)
        pooled[g].append((kept, (local[where] if local is not None else where) + layout.start(m)))
    chosen = [
        _top(torch.cat([v for v, _ in parts]), torch.cat([k for _, k in parts]), k)[1]
        for parts, k in zip(pooled, layout.group_k, strict=True)
    ]
    return _split(layout, torch.cat(chosen).sort().values)


def _split(layout: _Layout, sorted_keys: torch.Tensor) -> dict[str, torch.Tensor]:
    owner = layout.target_of(sorted_keys)
    indices = {}
    for m, name in enumerate(layout.names):
        local = sorted_keys[owner == m] - layout.start(m)
        if local.numel():
            indices[name] = local.to(torch.int32).cpu()
    return indices


# --- selections -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskRequest:
    model: nn.Module
    targets: list[tuple[str, nn.Parameter]]
    density: float
    batches: list[torch.Tensor]
    seed: int
    pool_factor: int


def _layout(request: MaskRequest, per_matrix: bool) -> _Layout:
    names = [name for name, _ in request.targets]
    params = [p for _, p in request.targets]
    if per_matrix:
        return _Layout(
            names,
            params,
            list(range(len(params))),
            [budget(request.density, p.numel()) for p in params],
        )
    total = sum(p.numel() for p in params)
    return _Layout(names, params, [0] * len(params), [budget(request.density, total)])


def _by_gradient(per_matrix: bool):
    def select(request: MaskRequest) -> tuple[dict[str, torch.Tensor], SensitivityStats]:
        layout = _layout(request, per_matrix)
        return squared_gradient_topk(request.model, layout, request.batches, request.pool_factor)

    return select


@torch.no_grad()
def _by_magnitude(request: MaskRequest) -> tuple[dict[str, torch.Tensor], SensitivityStats]:
    indices = {}
    for name, p in request.targets:
        k = budget(request.density, p.numel())
        top = torch.topk(p.detach().reshape(-1).abs().float(), k).indices
        indices[name] = top.sort().values.to(torch.int32).cpu()
    return indices, SensitivityStats()


def _uniform_subset(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct indices below ``numel``, uniformly; O(k) memory, not a full randperm."""
    distinct = torch.empty(0, dtype=torch.long)
    while distinct.numel() < k:
        draws = torch.randint(numel, (2 * k,), generator=generator)
        distinct = torch.unique(torch.cat([distinct, draws]))
    # By symmetry a uniform k-subset of the distinct values is a uniform k-subset of all.
    return distinct[torch.randperm(distinct.numel(), generator=generator)[:k]].sort().values


def _by_random(request: MaskRequest) -> tuple[dict[str, torch.Tensor], SensitivityStats]:
    indices = {}
    for name, p in request.targets:
        # seeded by name, so adding a target elsewhere leaves this matrix's draw unchanged
        generator = torch.Generator().manual_seed(mix_seed(request.seed, zlib.crc32(name.encode())))
        numel = weight_numel(p)
        indices[name] = _uniform_subset(numel, budget(request.density, numel), generator).to(
            torch.int32
        )
    return indices, SensitivityStats()


@dataclass(frozen=True)
class Selection:
    choose: Callable[[MaskRequest], tuple[dict[str, torch.Tensor], SensitivityStats]]
    needs_data: bool
    description: str


SELECTIONS: dict[str, Selection] = {
    "sensitive": Selection(_by_gradient(False), True, "global top-k of summed squared gradients"),
    "per_matrix": Selection(_by_gradient(True), True, "top-k summed squared gradients per matrix"),
    "magnitude": Selection(_by_magnitude, False, "top-k |W| per matrix"),
    "random": Selection(_by_random, False, "seeded uniform k entries per matrix"),
}


@dataclass
class MaskResult:
    indices: dict[str, torch.Tensor]
    tokens: int
    targeted_numel: int
    stats: SensitivityStats


def build_mask(
    model: nn.Module,
    tokenizer=None,
    texts: Sequence[str] | None = None,
    density: float = 0.001,
    selection: str = "sensitive",
    *,
    include_embeddings: bool = False,
    targets: Iterable[str] | None = None,
    seq_len: int = 128,
    batch_size: int = 4,
    max_tokens: int | None = None,
    seed: int = 0,
    pool_factor: int = 4,
) -> MaskResult:
    """:func:`compute_mask` with the token count and the exactness statistics."""
    if selection not in SELECTIONS:
        raise MaskError(f"unknown selection {selection!r}; choose one of {sorted(SELECTIONS)}")
    if batch_size < 1 or pool_factor < 1:
        raise MaskError(
            f"batch_size and pool_factor must be >= 1 (got {batch_size}, {pool_factor})"
        )
    chosen = _resolve_targets(model, include_embeddings, targets)
    total = sum(weight_numel(p) for _, p in chosen)
    budget(density, total)  # validates density before any work
    spec = SELECTIONS[selection]
    quantized = [name for name, p in chosen if not p.is_floating_point()]
    if quantized and selection != "random":
        raise MaskError(
            f"selection {selection!r} needs full-precision weights, but {quantized[0]} is "
            "quantized: compute the mask on the unquantized checkpoint (zo mask --model DIR), "
            "then train over the 4-bit base with model.quant: nf4"
        )
    batches: list[torch.Tensor] = []
    if spec.needs_data:
        from zo.calibration import read_texts, tokenize_chunks

        if tokenizer is None:
            raise MaskError(f"selection {selection!r} needs a tokenizer for the calibration text")
        chunks = tokenize_chunks(
            texts if texts is not None else read_texts(), tokenizer, seq_len, max_tokens
        )
        device = chosen[0][1].device
        batches = [b.to(device) for b in chunks.split(batch_size)]
    request = MaskRequest(model, chosen, density, batches, seed, pool_factor)
    needs_grad = only_targets_need_grad(model, [p for _, p in chosen])
    with needs_grad if spec.needs_data else contextlib.nullcontext():
        indices, stats = spec.choose(request)
    return MaskResult(indices, sum(b.numel() for b in batches), total, stats)


def compute_mask(
    model: nn.Module, tokenizer=None, texts: Sequence[str] | None = None, **options
) -> dict[str, torch.Tensor]:
    """Weight name -> sorted flat ``int32`` indices (see :func:`build_mask` for options)."""
    return build_mask(model, tokenizer, texts, **options).indices


def _resolve_targets(
    model: nn.Module, include_embeddings: bool, targets: Iterable[str] | None
) -> list[tuple[str, nn.Parameter]]:
    if targets is None:
        return mask_targets(model, include_embeddings)
    params = dict(model.named_parameters())
    wanted = list(targets)
    unknown = [name for name in wanted if name not in params]
    if unknown:
        raise MaskError(f"targets {unknown[:3]} are not parameters of the model")
    if not wanted:
        raise MaskError("targets is empty; name at least one weight")
    return [(name, params[name]) for name in wanted]


@contextlib.contextmanager
def only_targets_need_grad(model: nn.Module, targets: list[nn.Parameter]) -> Iterator[None]:
    """Gradients for the targets only (no memory for the rest); flags restored on exit."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    wanted = {id(p) for p in targets}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None


# --- mask files -------------------------------------------------------------------------------


def save_mask(
    path: str | os.PathLike[str], indices: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write a mask file atomically (a temporary sibling renamed into place)."""
    _check_indices(indices)
    target = Path(path)
    meta = {str(k): str(v) for k, v in metadata.items()} | {"format_version": FORMAT_VERSION}
    temporary = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    try:
        save_file(
            {name: t.contiguous() for name, t in indices.items()}, str(temporary), metadata=meta
        )
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def load_mask(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(weight name -> indices, metadata) of a mask file: the one reader of mask files.

    A file written by another version of the format is refused; one without a version
    (made by hand, e.g. with ``safetensors.torch.save_file``) is read as this version.
    """
    source = Path(path)
    if not source.is_file():
        raise MaskError(
            f"mask file {source} does not exist; create one with `zo mask --out {source}`"
        )
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            names = handle.keys()
            indices = {name: handle.get_tensor(name) for name in names}
    except Exception as error:  # safetensors raises its own error types
        raise MaskError(f"{source} is not a readable safetensors mask file: {error}") from None
    version = metadata.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise MaskError(
            f"{source}: mask format_version {version!r}, this zo reads {FORMAT_VERSION!r}"
        )
    _check_indices(indices, str(source))
    return indices, metadata


def _check_indices(indices: dict[str, torch.Tensor], where: str = "mask") -> None:
    for name, t in indices.items():
        if t.dtype != torch.int32 or t.dim() != 1:
            raise MaskError(
                f"{where}: {name} must be 1-D int32 flat indices, got {t.dtype} {tuple(t.shape)}"
            )


def validate_mask(indices: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise :class:`MaskError` unless every entry names a weight of ``model`` with sorted,
    unique, in-range flat indices."""
    params = dict(model.named_parameters(remove_duplicate=False))
    _check_indices(indices)
    for name, t in indices.items():
        if name not in params:
            close = [n for n in params if n.split(".")[-2:] == name.split(".")[-2:]][:3]
            raise MaskError(
                f"mask names {name!r}, which is not a parameter of {type(model).__name__}"
                + (f" (similar: {close})" if close else "")
                + "; was the mask computed for another model?"
            )
        numel = params[name].numel()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= numel):
            raise MaskError(
                f"mask {name}: indices must lie in [0, {numel}) (the weight's size), "
                f"found {int(t.min())}..{int(t.max())}; was the mask computed for another model?"
            )
        if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
            raise MaskError(f"mask {name}: indices must be sorted and unique (strictly increasing)")
