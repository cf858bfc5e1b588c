"""The ``philox`` generator's CUDA kernels (Triton): one launch draws and applies a bucket.

Each kernel computes the same counters and words as :func:`zo.philox.philox4x32` (the
integer stage is bit-identical) and the same float transform, with the device math library
(libdevice ``log``/``cos``/``sin``, ``sqrt_rn``) and without FMA contraction, so its values
match the eager torch implementation on the same device up to the math library's rounding.

* :func:`axpz`: ``targets[k] = d * sources[k] + sum_q (scale * c_q) z_q`` over any number of
  tensors in one launch: a segment table (source pointer, target offset or pointer, length,
  tensor index, start) and a program table are built once per tensor list and cached on the
  device, so a step sends nothing host-to-device; seeds travel as launch arguments.
* :func:`fill`: one contiguous range of one tensor's direction (head chunks, tangents).
* :func:`rows_add`: an embedding's perturbation at the batch's rows, added to its output.

Nothing here reads a device value on the host.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

try:  # the libdevice module moved between Triton releases
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton
    from triton.language.extra.cuda import libdevice  # type: ignore[no-redef]

BLOCK = 1024
"""Elements per program (a multiple of 4: programs start on counter boundaries)."""
MAX_QUERIES = 4
"""Seeds per launch (launch arguments); more queries take several launches."""

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}
_GAUSSIAN = {"gaussian": True, "rademacher": False}


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1, ROUNDS: tl.constexpr):
    for _ in tl.static_range(ROUNDS):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(0xCD9E8D57, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(0xD2511F53, _c0) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _gaussian_pair(radius_word, angle_word, LIBDEVICE: tl.constexpr):
    u = ((radius_word >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
    angle = (angle_word >> 8).to(tl.float32) * 5.9604644775390625e-08 * 6.283185307179586
    if LIBDEVICE:  # the CUDA math library, as ATen's log/cos/sin kernels use
        radius = tl.sqrt_rn(libdevice.log(u) * -2.0)
        return radius * libdevice.cos(angle), radius * libdevice.sin(angle)
    else:  # Triton's interpreter (tests on a CPU) has no libdevice
        radius = tl.sqrt_rn(tl.log(u) * -2.0)
        return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def _sign(word):
    return 1.0 - ((word >> 31) * 2).to(tl.float32)


@triton.jit
def _values(
    base,
    index,
    seed_lo,
    seed_hi,
    GAUSSIAN: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Direction values of elements ``base .. base + BLOCK`` (``base`` a multiple of 4)."""
    counters = base // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    lo = (counters & 0xFFFFFFFF).to(tl.uint32)
    hi = (counters >> 32).to(tl.uint32)
    tensor = (lo * 0 + index.to(tl.uint32)).to(tl.uint32)
    zero = lo * 0
    w0, w1, w2, w3 = _philox(lo, hi, tensor, zero, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), 10)
    if GAUSSIAN:
        z0, z1 = _gaussian_pair(w0, w1, LIBDEVICE)
        z2, z3 = _gaussian_pair(w2, w3, LIBDEVICE)
    else:
        z0, z1, z2, z3 = _sign(w0), _sign(w1), _sign(w2), _sign(w3)
    # element 4 n + lane: join to [n, 2, 2] with z0 z1 / z2 z3 in the minor two dims
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])


@triton.jit(
    do_not_specialize=["s0lo", "s0hi", "s1lo", "s1hi", "s2lo", "s2hi", "s3lo", "s3hi", "scale"]
)
def _axpz_kernel(
    segments,
    programs,
    target_base,
    coefficients,
    scale,
    s0lo,
    s0hi,
    s1lo,
    s1hi,
    s2lo,
    s2hi,
    s3lo,
    s3hi,
    QUERIES: tl.constexpr,
    DECAY: tl.constexpr,
    IN_PLACE: tl.constexpr,
    SOURCE: tl.constexpr,
    TARGET: tl.constexpr,
    GAUSSIAN: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    segment = tl.load(programs + 2 * pid)
    part = tl.load(programs + 2 * pid + 1).to(tl.int64)
    row = segments + 5 * segment
    source = tl.load(row).to(tl.pointer_type(SOURCE))
    target_at = tl.load(row + 1)
    numel = tl.load(row + 2)
    index = tl.load(row + 3)
    start = tl.load(row + 4)
    if IN_PLACE:  # noqa: SIM108 (a constexpr branch: Triton compiles one side)
        target = target_at.to(tl.pointer_type(TARGET))
    else:
        target = target_base + target_at
    base = (start // 4) * 4 + part * BLOCK
    relative = base - start + tl.arange(0, BLOCK).to(tl.int64)
    mask = (relative >= 0) & (relative < numel)
    acc = tl.load(source + relative, mask=mask, other=0.0).to(tl.float32)
    if DECAY:
        acc = acc * tl.load(coefficients)
    acc = acc + (tl.load(coefficients + 1) * scale) * _values(
        base, index, s0lo, s0hi, GAUSSIAN, LIBDEVICE, BLOCK
    )
    if QUERIES > 1:
        acc = acc + (tl.load(coefficients + 2) * scale) * _values(
            base, index, s1lo, s1hi, GAUSSIAN, LIBDEVICE, BLOCK
        )
    if QUERIES > 2:
        acc = acc + (tl.load(coefficients + 3) * scale) * _values(
            base, index, s2lo, s2hi, GAUSSIAN, LIBDEVICE, BLOCK
        )
    if QUERIES > 3:
        acc = acc + (tl.load(coefficients + 4) * scale) * _values(
            base, index, s3lo, s3hi, GAUSSIAN, LIBDEVICE, BLOCK
        )
    tl.store(target + relative, acc.to(TARGET), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "start", "index"])
def _fill_kernel(
    out,
    numel,
    start,
    index,
    seed_lo,
    seed_hi,
    GAUSSIAN: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    part = tl.program_id(0).to(tl.int64)
    base = (start // 4) * 4 + part * BLOCK
    relative = base - start + tl.arange(0, BLOCK).to(tl.int64)
    mask = (relative >= 0) & (relative < numel)
    z = _values(base, index, seed_lo, seed_hi, GAUSSIAN, LIBDEVICE, BLOCK)
    tl.store(out + relative, z, mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "index", "scale"])
def _rows_kernel(
    out,
    ids,
    row,
    index,
    seed_lo,
    seed_hi,
    scale,
    GAUSSIAN: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    first = tl.load(ids + token).to(tl.int64) * row
    base = (first // 4) * 4 + part * BLOCK
    column = base - first + tl.arange(0, BLOCK).to(tl.int64)
    mask = (column >= 0) & (column < row)
    where = out + token * row + column
    current = tl.load(where, mask=mask, other=0.0)
    z = _values(base, index, seed_lo, seed_hi, GAUSSIAN, LIBDEVICE, BLOCK)
    tl.store(where, (current.to(tl.float32) + scale * z).to(current.dtype), mask=mask)


def _split(seed: int) -> tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def _launch_options() -> dict:
    """No FMA contraction (each product and sum rounds as in the eager path); libdevice
    except under Triton's CPU interpreter, which lacks it."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    options = {"LIBDEVICE": not interpreted}
    if not interpreted:
        options["enable_fp_fusion"] = False
    return options


def fill(out: torch.Tensor, seed: int, index: int, start: int, distribution: str) -> None:
    numel = out.numel()
    if numel == 0:
        return
    parts = triton.cdiv(start % 4 + numel, BLOCK)
    lo, hi = _split(seed)
    _fill_kernel[(parts,)](
        out,
        numel,
        start,
        index,
        lo,
        hi,
        GAUSSIAN=_GAUSSIAN[distribution],
        BLOCK=BLOCK,
        **_launch_options(),
    )


def rows_add(
    out: torch.Tensor,
    ids: torch.Tensor,
    seed: int,
    index: int,
    row: int,
    scale: float,
    distribution: str,
) -> None:
    flat_ids = ids.reshape(-1).contiguous()
    if flat_ids.numel() == 0:
        return
    lo, hi = _split(seed)
    grid = (flat_ids.numel(), triton.cdiv(row + 3, BLOCK))
    _rows_kernel[grid](
        out,
        flat_ids,
        row,
        index,
        lo,
        hi,
        scale,
        GAUSSIAN=_GAUSSIAN[distribution],
        BLOCK=BLOCK,
        **_launch_options(),
    )


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
_MAX_TABLES = 4096
"""Tables kept (one per bucket and one per update's tensor list): a step must find all of
its own, or it would send them again, which waits for the device."""


def _tables(
    key: tuple, rows: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Segment and program tables for one tensor list, built once and kept on the device."""
    cached = _TABLES.get(key)
    if cached is not None:
        return cached
    programs = []
    for segment, (_, _, numel, _, start) in enumerate(rows):
        programs += [[segment, part] for part in range(triton.cdiv(start % 4 + numel, BLOCK))]
    segments = torch.tensor(rows, dtype=torch.int64).to(device)
    program_table = torch.tensor(programs, dtype=torch.int32).to(device)
    if len(_TABLES) >= _MAX_TABLES:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = (segments, program_table, len(programs))
    return _TABLES[key]


def axpz(
    sources: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    indices: Sequence[int],
    seeds: Sequence[int],
    coefficients: torch.Tensor,
    scale: float,
    decay: bool,
    distribution: str,
    starts: Sequence[int] | None = None,
) -> None:
    """One launch per dtype pair and group of :data:`MAX_QUERIES` seeds (see the module doc).

    In place when every target is its source; otherwise the targets are views of one buffer
    (a bucket, one dtype), addressed by their offset from the first target.
    """
    if not targets:
        return
    starts = list(starts) if starts is not None else [0] * len(targets)
    in_place = all(s.data_ptr() == t.data_ptr() for s, t in zip(sources, targets, strict=True))
    base = targets[0]
    if not in_place and (len(seeds) > MAX_QUERIES or any(t.dtype != base.dtype for t in targets)):
        raise ValueError(
            f"a bucket pass takes at most {MAX_QUERIES} seeds and targets of one dtype"
        )
    by_dtypes: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for k, (source, target) in enumerate(zip(sources, targets, strict=True)):
        by_dtypes.setdefault((source.dtype, target.dtype), []).append(k)
    for (source_dtype, target_dtype), members in by_dtypes.items():
        rows = []
        for k in members:
            source, target = sources[k], targets[k]
            at = (
                target.data_ptr()
                if in_place
                else (target.data_ptr() - base.data_ptr()) // target.element_size()
            )
            rows.append([source.data_ptr(), at, target.numel(), indices[k], starts[k]])
        key = (in_place, str(base.device), tuple(map(tuple, rows)))
        segments, programs, count = _tables(key, rows, base.device)
        if count == 0:
            continue
        for first in range(0, len(seeds), MAX_QUERIES):
            group = list(seeds[first : first + MAX_QUERIES])
            keys = [part for seed in group for part in _split(seed)]
            keys += [0] * (2 * MAX_QUERIES - len(keys))
            # later groups (in place only) read their c_q behind d: a view, no copy
            group_coefficients = coefficients if not first else coefficients[first:]
            _axpz_kernel[(count,)](
                segments,
                programs,
                base,
                group_coefficients,
                scale,
                *keys,
                QUERIES=len(group),
                DECAY=decay and first == 0,
                IN_PLACE=in_place,
                SOURCE=_TL_DTYPES[source_dtype],
                TARGET=_TL_DTYPES[target_dtype],
                GAUSSIAN=_GAUSSIAN[distribution],
                BLOCK=BLOCK,
                **_launch_options(),
            )
