"""Peak-memory measurement (process RSS on CPU, the caching allocator on CUDA) and timing."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak on ``device`` since the last reset: CUDA allocator peak, else peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_since_reset_bytes()


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Start peak tracking afresh (CUDA allocator stats; Linux VmHWM via clear_refs)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:  # not Linux, or not permitted: the peak then covers the whole process
        pass


def peak_rss_since_reset_bytes() -> int:
    """VmHWM: the peak RSS since the last :func:`reset_peak_memory` (Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds ``fn()`` takes, the device's queued work included (CUDA is synchronized
    before and after: kernels run asynchronously)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class CallCost:
    """What one call cost: wall seconds, and from ``getrusage`` the CPU seconds of every
    thread of this process and the minor page faults (fresh memory the kernel mapped in).
    The last two hardly depend on other load on a shared machine; wall time does."""

    seconds: float
    user_seconds: float
    system_seconds: float
    minor_faults: int


def measure_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> CallCost:
    """:func:`time_call`, with the CPU time and minor page faults the call took."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = time_call(fn, device)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return CallCost(
        seconds,
        after.ru_utime - before.ru_utime,
        after.ru_stime - before.ru_stime,
        after.ru_minflt - before.ru_minflt,
    )


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def return_large_frees_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Make glibc serve every allocation >= ``threshold_bytes`` with its own mmap.

    glibc raises its mmap threshold after a large block is freed, so later blocks of that
    size come from the heap and stay resident after ``free``. A ZO step allocates and frees
    layer-sized temporaries over and over; with a fixed threshold they go back to the OS at
    once and peak RSS stays at the forward pass's (measured: experiments/RESULTS.md).
    Process-wide, so applications call it, not the library. False where not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False
