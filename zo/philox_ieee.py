"""The ``philox-ieee`` direction generator: philox's counters, a transform in exact arithmetic.

Element ``j`` of tensor ``i`` at step seed ``s`` is lane ``j % 4`` of Philox4x32-10 with key
``s`` and counter ``(j // 4, i, 0)``, as for ``philox`` (:mod:`zo.philox`); rademacher values
are philox's. Gaussian values come from Box-Muller on the word pairs (w0, w1) and (w2, w3)
like philox's, but ``ln``, ``cos`` and ``sin`` are fixed polynomials evaluated in IEEE basic
operations (``+ - * /``, ``sqrt``, integer ops) in a fixed order, never a math library: so
every implementation gives the same bits on every device --

* a C kernel on CPU (:mod:`zo.native`, ``zo/native/philox_ieee.c``, built on first use with
  the system's C compiler): the draw, scale and add of a pass fused, ~3x the values per
  second of torch's own CPU generator on one thread (``zo bench generators``);
* torch ops (this module): the reference the kernel is tested against, and the
  implementation on any device without a kernel (exact, slower; said once).

The polynomials are Taylor series after exact range reduction (the exponent of ``u`` and the
octant of the angle come from integer bits): ``|error| < 3e-7`` for ``ln m`` and ``3e-8`` for
``cos``/``sin``, far below anything a direction needs, and identical everywhere.
"""

from __future__ import annotations

import threading

import torch

from zo import native
from zo.direction_base import add_scaled, eager_axpz, run_jobs, say_once
from zo.philox import (
    MATH_GRAIN,
    PHILOX_PIECE,
    PhiloxGenerator,
    philox_rows,
    philox_values,
)

_LOG_POLY = (
    0.111111111938953399658203125,  # 1/9
    0.142857149243354797363281250,  # 1/7
    0.200000002980232238769531250,  # 1/5
    0.333333343267440795898437500,  # 1/3
)
_SIN_POLY = (
    2.755731884462875314056873321533203125e-6,  # 1/9!
    -1.98412701138295233249664306640625e-4,  # -1/7!
    8.333333767950534820556640625e-3,  # 1/5!
    -0.16666667163372039794921875,  # -1/3!
)
_COS_POLY = (
    2.48015876e-5,  # 1/8!
    -1.388888922519981861114501953125e-3,  # -1/6!
    4.1666667163372039794921875e-2,  # 1/4!
    -0.5,
)
_SQRT2 = 1.41421353816986083984375
_LN2_HIGH = 0.693145751953125  # 16 significant bits: k * _LN2_HIGH is exact for |k| <= 25
_LN2_LOW = 1.428606765330187045037746429443359375e-6
_OCTANT_STEP = 3.745070282923589484626427292823791503906e-7  # (pi / 4) / 2**21


class _Constants:
    """fp32 scalars on one device: ``tensor * python_float`` may compute in double on some
    backends, an fp32 tensor operand never does."""

    def __init__(self, device: torch.device):
        self.device = device
        self._cache: dict[float, torch.Tensor] = {}

    def __call__(self, value: float) -> torch.Tensor:
        if value not in self._cache:
            self._cache[value] = torch.tensor(value, dtype=torch.float32, device=self.device)
        return self._cache[value]


def _horner(x2: torch.Tensor, coefficients: tuple[float, ...], c: _Constants) -> torch.Tensor:
    """``((c0 x2 + c1) x2 + c2) ...``, each product and sum rounded once (no fused ops)."""
    p = c(coefficients[0]).expand_as(x2)
    for coefficient in coefficients[1:]:
        p = torch.add(torch.mul(p, x2), c(coefficient))
    return p


def _radius(word: torch.Tensor, c: _Constants) -> torch.Tensor:
    """``sqrt(-2 ln u)``, ``u = ((word >> 8) + 1) / 2**24``: the C kernel's ``radius``."""
    f = ((word >> 8) + 1).to(torch.float32)  # exact: at most 2**24
    bits = f.view(torch.int32)
    exponent = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > c(_SQRT2)
    m = torch.where(big, torch.mul(m, c(0.5)), m)
    exponent = exponent + big.to(torch.int32)
    s = torch.div(torch.sub(m, c(1.0)), torch.add(m, c(1.0)))
    s2 = torch.mul(s, s)
    p = _horner(s2, _LOG_POLY, c)
    twice = torch.add(s, s)
    ln_m = torch.add(torch.mul(twice, torch.mul(p, s2)), twice)
    k = (exponent - 24).to(torch.float32)
    tail = torch.add(torch.mul(k, c(_LN2_LOW)), ln_m)
    ln_u = torch.add(torch.mul(k, c(_LN2_HIGH)), tail)
    # torch's fp32 sqrt on CPU is within an ulp, not correctly rounded; in fp64 it is, and
    # rounding that to fp32 gives the correctly rounded fp32 root (53 >= 2 * 24 + 2 bits)
    return torch.sqrt(torch.mul(ln_u, c(-2.0)).double()).float()


def _cos_sin(word: torch.Tensor, c: _Constants) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``2 pi a / 2**24``, ``a = word >> 8``: the C kernel's ``cos_sin``."""
    a = word >> 8
    octant = a >> 21
    low = a & 0x1FFFFF
    odd = (octant & 1) == 1
    within = torch.where(odd, 0x200000 - low, low)
    x = torch.mul(within.to(torch.float32), c(_OCTANT_STEP))
    x2 = torch.mul(x, x)
    sn = torch.add(torch.mul(torch.mul(_horner(x2, _SIN_POLY, c), x2), x), x)
    cs = torch.add(torch.mul(_horner(x2, _COS_POLY, c), x2), c(1.0))
    sn = torch.where(odd, -sn, sn)
    quadrant = ((octant + 1) >> 1) & 3
    table_sin = torch.stack([sn, cs, -sn, -cs])
    table_cos = torch.stack([cs, -sn, -cs, sn])
    pick = quadrant.unsqueeze(0)
    return table_cos.gather(0, pick)[0], table_sin.gather(0, pick)[0]


def ieee_values(words: list[torch.Tensor], distribution: str) -> torch.Tensor:
    """Four words per counter (1-D) -> ``[n, 4]`` fp32 values (element ``4 n + lane``)."""
    if distribution == "rademacher":
        return torch.stack([1.0 - ((w >> 31) * 2).to(torch.float32) for w in words], dim=1)
    count = words[0].numel()
    out = torch.empty(count, 4, device=words[0].device)
    c = _Constants(words[0].device)
    for first in range(0, count, MATH_GRAIN):  # each op in its caller's thread
        last = min(first + MATH_GRAIN, count)
        for lane, (radius_word, angle_word) in ((0, words[:2]), (2, words[2:])):
            radius = _radius(radius_word[first:last], c)
            cosine, sine = _cos_sin(angle_word[first:last], c)
            torch.mul(radius, cosine, out=out[first:last, lane])
            torch.mul(radius, sine, out=out[first:last, lane + 1])
    return out


def reference_values(
    seed: int, index: int, start: int, count: int, distribution: str, device
) -> torch.Tensor:
    """``count`` values of tensor ``index``'s direction from element ``start``, in torch ops."""
    return philox_values(seed, index, start, count, distribution, device, transform=ieee_values)


_KERNEL: list = []
"""The process's kernel, or why there is none (a failed build is not retried)."""
_KERNEL_LOCK = threading.Lock()


def native_kernel() -> native.PhiloxIEEEKernel:
    """The C kernel, built on first use and checked against :func:`reference_values`;
    raises :class:`zo.native.NativeUnavailable` (with the reason) where there is none."""
    with _KERNEL_LOCK:  # draw threads may ask at once: one build, one load, one probe
        if not _KERNEL:
            try:
                _KERNEL.append(native.philox_ieee_kernel(reference_values))
            except native.NativeUnavailable as error:
                _KERNEL.append(error)
    if isinstance(_KERNEL[0], native.NativeUnavailable):
        raise _KERNEL[0]
    return _KERNEL[0]


class PhiloxIEEEGenerator(PhiloxGenerator):
    """``philox-ieee``: philox's counters and passes (``torch.ops.zo.philox_ieee_*``), with
    the exact transform: the C kernel on CPU, torch ops elsewhere or where the kernel cannot
    be built (said once; the values are the same)."""

    name = "philox-ieee"
    operators = "philox_ieee"

    def job_size(self) -> int:
        return native.PIECE  # a kernel call per piece: its Python overhead (~5 us) is noise


def _kernel_for(device: torch.device) -> native.PhiloxIEEEKernel | None:
    """The C kernel for tensors on ``device``, or None (torch ops: said once, with why)."""
    if device.type != "cpu":
        say_once(
            f"philox-ieee has no {device.type} kernel: drawing with torch ops (the same "
            "values, slower); engine.generator=philox is the CUDA kernel",
            __name__,
        )
        return None
    try:
        return native_kernel()
    except native.NativeUnavailable as error:
        say_once(f"philox-ieee draws with torch ops (the same values, slower): {error}", __name__)
        return None


def _fill(out: torch.Tensor, seed: int, index: int, start: int, law: str, threads: int = 1):
    """One call: the engine cuts a large fill into jobs on its threads (``threads`` unused)."""
    kernel = _kernel_for(out.device)
    if kernel is None:
        for piece in range(0, out.numel(), PHILOX_PIECE):
            stop = min(piece + PHILOX_PIECE, out.numel())
            out[piece:stop] = reference_values(
                seed, index, start + piece, stop - piece, law, out.device
            )
        return
    _check_flat_fp32(out)
    kernel.fill(out, seed, index, start, int(law == "gaussian"))


def _rows_add(out, ids, seed: int, index: int, row: int, scale: float, law: str) -> None:
    """``out += scale * z`` at rows ``ids`` of a ``row``-wide weight (an embedding's
    output-side perturbation); the torch-ops path never reads the ids on the host."""
    flat_ids = ids.reshape(-1).to(torch.int64)
    if flat_ids.numel() == 0:
        return
    kernel = _kernel_for(out.device)
    if kernel is None:
        rows = philox_rows(flat_ids, seed, index, row, law, transform=ieee_values)
    else:
        rows = torch.empty(flat_ids.numel(), row, device=out.device)
        kernel.fill_rows(rows, flat_ids.contiguous(), row, seed, index, int(law == "gaussian"))
    add_scaled(out, rows, scale)


def _axpz(sources, targets, indices, seeds, coefficients, scale, decay, law, threads, starts):
    kernel = _kernel_for(targets[0].device) if len(targets) else None
    fused = kernel is not None and all(
        t.dtype == s.dtype == torch.float32 and t.is_contiguous() and s.is_contiguous()
        for s, t in zip(sources, targets, strict=True)
    )
    if not fused:  # other dtypes: the values drawn (by the kernel), torch ops scale and add
        eager_axpz(
            _Drawing(law, threads), sources, targets, indices, seeds, coefficients, scale,
            decay, starts,
        )  # fmt: skip
        return
    # the reference's factors, computed by the same torch op: bit-identical products
    factors = (coefficients[1:] * scale).tolist()
    d = float(coefficients[0]) if decay else 1.0
    decay = decay and d != 1.0  # x * 1 == x bit for bit: an update without decay, one pass
    gaussian = int(law == "gaussian")
    if kernel.serial_reason is None:  # one call, on torch's OpenMP threads
        kernel.axpz_many(
            sources, targets, indices, starts, seeds, factors, decay, d, gaussian, threads
        )
        return
    if threads > 1:
        say_once(
            f"philox-ieee's passes run on Python draw threads: {kernel.serial_reason}", __name__
        )
    jobs = []
    for source, target, index, offset in zip(sources, targets, indices, starts, strict=True):
        for first in range(0, target.numel(), native.PIECE):
            last = min(first + native.PIECE, target.numel())
            jobs.append(
                kernel.axpz_job(
                    source[first:last],
                    target[first:last],
                    index,
                    offset + first,
                    seeds,
                    factors,
                    decay,
                    d,
                    gaussian,
                )
            )
    run_jobs(jobs, threads)


class _Drawing(PhiloxIEEEGenerator):
    """What :func:`eager_axpz` draws through inside an operator: the implementation itself,
    not the operator again."""

    def fill(self, out: torch.Tensor, seed: int, index: int, start: int) -> None:
        _fill(out, seed, index, start, self.distribution)


def _register_operators() -> torch.library.Library:
    library = torch.library.Library("zo", "FRAGMENT")  # zo.philox owns the namespace
    library.define(
        "philox_ieee_axpz(Tensor[] sources, Tensor(a!)[] targets, int[] indices, int[] seeds, "
        "Tensor coefficients, float scale, bool decay, str distribution, int threads, "
        "int[] starts) -> ()"
    )
    library.define(
        "philox_ieee_fill(Tensor(a!) out, int seed, int index, int start, str distribution, "
        "int threads) -> ()"
    )
    library.define(
        "philox_ieee_rows_add(Tensor(a!) out, Tensor ids, int seed, int index, int row, "
        "float scale, str distribution) -> ()"
    )
    for name, implementation in (
        ("philox_ieee_axpz", _axpz),
        ("philox_ieee_fill", _fill),
        ("philox_ieee_rows_add", _rows_add),
    ):  # every backend: the kernel on CPU, torch ops elsewhere (the same values)
        library.impl(name, implementation, "CompositeExplicitAutograd")
    return library


_LIBRARY = _register_operators()


def _check_flat_fp32(out: torch.Tensor) -> None:
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"philox-ieee fills contiguous fp32 tensors, got {out.dtype}")
