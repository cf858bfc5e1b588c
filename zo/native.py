"""Native CPU kernels, built on first use with the system's C compiler and cached.

Only ``philox-ieee``'s kernel lives here (``zo/native/philox_ieee.c``). It is plain C (no
torch headers: it builds in about a second) called through :mod:`ctypes`, which releases
the GIL for the call.

Threads: the kernel is built with OpenMP and then runs a pass on torch's own OpenMP thread
pool (the library names the runtime by its soname, which torch has already loaded). Between
two matmuls of a forward, torch's workers spin waiting for work; draw threads of another
pool would compete with them for the cores, these do the work instead (2x faster inside a
forward on two cores, ``experiments/RESULTS.md``). Where the compiler has no OpenMP, or the
library got a runtime of its own, the kernel is built or used serially and the engine's
Python draw threads run it, said once with the reason.

Trust: a library is cached under a name that hashes its source, the compiler and its
version, the flags and the CPU's feature flags (``-march=native``), and written to a
temporary file then renamed, so a half-written library is never loaded. Every library,
fresh or cached, must reproduce the torch-ops reference bit for bit on a sample before it
is used; one that does not is refused, naming its file.

``ZO_NATIVE_CACHE`` sets the cache folder (default ``$XDG_CACHE_HOME/zo/native`` or
``~/.cache/zo/native``); ``CC`` the compiler (default ``cc``, then ``gcc``, ``clang``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "native" / "philox_ieee.c"
ABI_VERSION = 2
FLAGS = (
    "-O3",
    "-march=native",
    "-std=c11",
    "-shared",
    "-fPIC",
    # sqrtf without errno handling (a vector instruction, exact); no fused multiply-add
    # (it would round once where the reference rounds twice); no -ffast-math, ever
    "-fno-math-errno",
    "-ffp-contract=off",
)
X86_FLAGS = ("-mprefer-vector-width=512",)
"""Where the CPU has AVX-512, use its full width (gcc prefers 256 bits by default)."""


OPENMP_FLAGS = ("-fopenmp",)


def flags(openmp: bool = True) -> tuple[str, ...]:
    machine = X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else ()
    return FLAGS + machine + (OPENMP_FLAGS if openmp else ())


class NativeUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here (no compiler, a failed build)."""


class NativeMismatch(NativeUnavailable):
    """A built kernel gave other values than the reference: refused, never used."""


def cache_dir() -> Path:
    if os.environ.get("ZO_NATIVE_CACHE"):
        return Path(os.environ["ZO_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zo" / "native"


def compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name) or name
    raise NativeUnavailable(
        "no C compiler found (tried $CC, cc, gcc, clang): install one (e.g. apt install gcc) "
        "for the fast CPU kernel, or set engine.generator=torch-blocks"
    )


def _cpu_features() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where the OS says them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path(cc: str, openmp: bool = True) -> Path:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError as error:
        raise NativeUnavailable(f"cannot run the C compiler {cc} ({error})") from None
    key = hashlib.sha256()
    options = " ".join(flags(openmp)).encode()
    for part in (SOURCE.read_bytes(), cc.encode(), version.encode(), options):
        key.update(part)
        key.update(b"\0")
    key.update(f"{platform.machine()}\0{_cpu_features()}".encode())
    return cache_dir() / f"philox_ieee-{key.hexdigest()[:20]}{_suffix()}"


def _suffix() -> str:
    return ".dll" if os.name == "nt" else ".so"


def build(cc: str, target: Path, openmp: bool = True) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=_suffix() + ".tmp")
    except OSError as error:
        raise NativeUnavailable(
            f"cannot write the kernel cache {target.parent} ({error}): set ZO_NATIVE_CACHE to "
            "a writable folder"
        ) from None
    os.close(handle)
    try:
        try:
            result = subprocess.run(
                [cc, *flags(openmp), str(SOURCE), "-o", temporary],
                capture_output=True,
                text=True,
            )
        except OSError as error:
            raise NativeUnavailable(f"cannot run the C compiler {cc} ({error})") from None
        if result.returncode != 0:
            raise NativeUnavailable(
                f"building the philox-ieee kernel with {cc} failed "
                f"(exit {result.returncode}): {result.stderr.strip()[-600:]}"
            )
        os.replace(temporary, target)  # atomic: a reader sees no library or a whole one
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class PhiloxIEEEKernel:
    """Typed entry points of the built library, taking tensors.

    ``serial_reason`` is None when :meth:`axpz_many` runs on torch's OpenMP threads, else
    why it runs on one (the caller then cuts a pass into jobs for its own threads)."""

    def __init__(self, path: Path, serial_reason: str | None = None):
        self.path = path
        library = ctypes.CDLL(str(path))
        if library.zo_abi_version() != ABI_VERSION:
            raise NativeMismatch(
                f"{path} has ABI {library.zo_abi_version()}, expected {ABI_VERSION}"
            )
        self.serial_reason = serial_reason
        if serial_reason is None and not library.zo_openmp():
            self.serial_reason = f"{path} was built without OpenMP"
        elif serial_reason is None and not _shares_torch_threads(library):
            self.serial_reason = (
                f"{path} loaded an OpenMP runtime of its own, not torch's (its threads would "
                "compete with torch's for the cores)"
            )
        i64, u64, u32, f32, cint, ptr = (
            ctypes.c_int64,
            ctypes.c_uint64,
            ctypes.c_uint32,
            ctypes.c_float,
            ctypes.c_int,
            ctypes.c_void_p,
        )
        self._fill = library.zo_fill
        self._fill.argtypes = (ptr, i64, u64, u32, i64, cint)
        self._fill_rows = library.zo_fill_rows
        self._fill_rows.argtypes = (ptr, ptr, i64, i64, u64, u32, cint)
        self._axpz = library.zo_axpz_f32
        self._axpz.argtypes = (ptr, ptr, i64, u32, i64, ptr, ptr, cint, cint, f32, cint)
        self._axpz.restype = self._fill.restype = self._fill_rows.restype = None
        self._axpz_many = library.zo_axpz_many
        self._axpz_many.argtypes = (
            cint, ptr, ptr, ptr, ptr, ptr, ptr, ptr, cint, cint, f32, cint, i64, cint,
        )  # fmt: skip
        self._axpz_many.restype = None

    def fill(self, out: torch.Tensor, seed: int, index: int, start: int, gaussian: int) -> None:
        self._fill(out.data_ptr(), out.numel(), seed, index, start, gaussian)

    def fill_rows(self, out, ids, row: int, seed: int, index: int, gaussian: int) -> None:
        self._fill_rows(out.data_ptr(), ids.data_ptr(), ids.numel(), row, seed, index, gaussian)

    def axpz_job(self, source, target, index, start, seeds, factors, decay, d, gaussian):
        """One call computing ``target`` (fp32, contiguous) from ``source``: a draw-pool job."""
        seed_array = (ctypes.c_uint64 * len(seeds))(*seeds)
        factor_array = (ctypes.c_float * len(factors))(*factors)

        def job() -> None:
            self._axpz(
                source.data_ptr(),
                target.data_ptr(),
                target.numel(),
                index,
                start,
                seed_array,
                factor_array,
                len(seeds),
                int(decay),
                d,
                gaussian,
            )

        return job

    def axpz_many(
        self,
        sources,
        targets,
        indices,
        starts,
        seeds,
        factors,
        decay,
        d,
        gaussian,
        threads,
        piece: int = 0,
    ) -> None:
        """:meth:`axpz_job` over many tensors in one call, on up to ``threads`` of torch's
        OpenMP threads (one where :attr:`serial_reason` says why)."""
        count = len(targets)
        pointers = ctypes.c_void_p * count
        self._axpz_many(
            count,
            pointers(*[s.data_ptr() for s in sources]),
            pointers(*[t.data_ptr() for t in targets]),
            (ctypes.c_int64 * count)(*[t.numel() for t in targets]),
            (ctypes.c_uint32 * count)(*indices),
            (ctypes.c_int64 * count)(*starts),
            (ctypes.c_uint64 * len(seeds))(*seeds),
            (ctypes.c_float * len(factors))(*factors),
            len(seeds),
            int(decay),
            d,
            gaussian,
            piece or PIECE,
            threads if self.serial_reason is None else 1,
        )


PIECE = 1 << 18
"""Elements per piece of a threaded pass: ~0.3 ms of work, a unit small enough to balance two
to eight threads over a bucket and large enough that scheduling it is noise."""


def _shares_torch_threads(library) -> bool:
    """Is the library's OpenMP runtime torch's? Set this thread's OpenMP thread count through
    the library to one torch would not pick, ask torch, and put it back: only this thread's
    count moves, never torch's or MKL's global settings."""
    probe = torch.get_num_threads() + 3
    before = library.zo_openmp_set_threads(probe)
    try:
        return torch.get_num_threads() == probe
    finally:
        library.zo_openmp_set_threads(before)


Reference = Callable[[int, int, int, int, str, str], torch.Tensor]
"""``(seed, index, start, count, distribution, device) -> values``: what a kernel must give."""


def _check_against_reference(kernel: PhiloxIEEEKernel, reference_values: Reference) -> None:
    """Refuse a kernel that does not reproduce the torch-ops reference bit for bit: its
    values, and a fused pass (``source + z * c`` and a decayed two-seed update)."""
    for law, gaussian in (("gaussian", 1), ("rademacher", 0)):
        for seed, index, start, count in ((7, 0, 0, 4099), (2**62 + 5, 3, 1_000_003, 1031)):
            got = torch.empty(count)
            kernel.fill(got, seed, index, start, gaussian)
            want = reference_values(seed, index, start, count, law, "cpu")
            _refuse_unless_equal(kernel, got, want, f"{law} values, seed {seed}")
    source = torch.linspace(-1.0, 1.0, 1001)
    z = [reference_values(seed, 2, 5, 1001, "gaussian", "cpu") for seed in (11, 12)]
    factor, decay = torch.tensor([0.01, -0.3]), torch.tensor(0.9)  # fp32 operands throughout
    for seeds, decayed, want in (
        ([11], False, source + z[0] * factor[0]),
        ([11, 12], True, (source * decay + z[0] * factor[0]) + z[1] * factor[1]),
    ):
        got = torch.empty(1001)
        kernel.axpz_job(source, got, 2, 5, seeds, factor.tolist(), decayed, float(decay), 1)()
        _refuse_unless_equal(kernel, got, want, f"a fused pass over {len(seeds)} seed(s)")
        # the same pass cut into pieces of 99 elements on two threads, beside another tensor
        got, other = torch.empty(1001), torch.empty(7)
        kernel.axpz_many(
            [source, source[:7]], [got, other], [2, 2], [5, 5], seeds, factor.tolist(),
            decayed, float(decay), 1, threads=2, piece=99,
        )  # fmt: skip
        _refuse_unless_equal(kernel, got, want, f"a threaded pass over {len(seeds)} seed(s)")
        _refuse_unless_equal(kernel, other, want[:7], "a threaded pass over two tensors")


def _refuse_unless_equal(kernel, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
        raise NativeMismatch(
            f"the philox-ieee kernel {kernel.path} gives other values than the torch reference "
            f"({what}): refusing it. Delete the file to rebuild; if it persists, the compiler "
            "does not honour -ffp-contract=off (set CC to another compiler, or "
            "engine.generator=torch-blocks)"
        )


def load_checked(
    path: Path, reference: Reference, serial_reason: str | None = None
) -> PhiloxIEEEKernel:
    """Load the library at ``path`` and check it against the reference, or refuse it."""
    try:
        kernel = PhiloxIEEEKernel(path, serial_reason)
    except (OSError, AttributeError) as error:
        raise NativeUnavailable(
            f"cannot load the philox-ieee kernel {path} ({error}): delete the file to rebuild it"
        ) from None
    _check_against_reference(kernel, reference)
    return kernel


def philox_ieee_kernel(reference: Reference) -> PhiloxIEEEKernel:
    """The kernel, built if needed and checked against ``reference``; raises
    :class:`NativeUnavailable` when it cannot be built, loaded or trusted."""
    cc = compiler()
    path = library_path(cc)
    try:
        if not path.exists():
            build(cc, path)
    except NativeUnavailable as error:  # e.g. a compiler without OpenMP: build it serial
        serial = library_path(cc, openmp=False)
        if not serial.exists():
            build(cc, serial, openmp=False)
        reason = f"building it with OpenMP failed ({str(error)[-300:]})"
        return load_checked(serial, reference, reason)
    return load_checked(path, reference)
