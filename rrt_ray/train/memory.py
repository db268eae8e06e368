"""This process's resident memory, from /proc/self/status (Linux): what a training worker reports as its peak.

VmHWM is the peak resident set since the process started (or since reset_peak()); RssFile is the part backed
by files, e.g. safetensors weights mapped read-only, which the workers of one machine share in the page cache,
so the machine's memory is less than the workers' peaks added up. Elsewhere (no /proc) every value is 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path
from typing import Any

FIELDS = {"VmRSS": "rss_mb", "VmHWM": "peak_rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}


def resident_memory() -> dict[str, float]:
    """{rss_mb, peak_rss_mb, anon_mb, file_mb} of this process, in MiB."""
    values = dict.fromkeys(FIELDS.values(), 0.0)
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[FIELDS[key]] = int(rest.split()[0]) / 1024  # kB
    return values


def reset_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux >= 4.0), to measure one phase's peak; False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


@functools.cache
def _glibc(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve later allocations of at least nbytes that the heap's free chunks cannot hold from their own mmap,
    unmapped when freed (glibc mallopt; what MALLOC_MMAP_THRESHOLD_ does from the environment, settable after
    start: so set it before the models load, while the heap is small). It also turns off glibc's
    dynamic threshold, which otherwise climbs to 32 MiB after the first large free and keeps a training step's
    activation blocks (a few MiB each) in the heap. Returns False where there is no glibc or it refuses."""
    mallopt = _glibc("mallopt")
    return bool(mallopt is not None and mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(nbytes)))


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc malloc_trim(0)); False where there is no glibc.

    glibc serves the activations of a training step (blocks of a few MiB, under its dynamic mmap threshold)
    from the heap and keeps the freed ones resident, scattered between live blocks, so the next phase's
    differently shaped blocks stack on top of them (issue 11, item 7). malloc_trim(0) releases every free page,
    not only the heap's top, at the cost of a walk of the heap and of page faults when the pages are reused."""
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim(ctypes.c_size_t(0))
    return True
