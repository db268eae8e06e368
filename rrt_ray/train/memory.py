"""This process's resident memory, from /proc/self/status (Linux): what a training worker reports as its peak.

VmHWM is the peak resident set since the process started (or since reset_peak()); RssFile is the part backed
by files, e.g. safetensors weights mapped read-only, which the workers of one machine share in the page cache,
so the machine's memory is less than the workers' peaks added up. Elsewhere (no /proc) every value is 0.
"""

from __future__ import annotations

from pathlib import Path

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
