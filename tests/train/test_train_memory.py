"""rrt_ray/train/memory.py: this process's resident memory from /proc (Linux, as on every machine here)."""

import mmap

from rrt_ray.train.memory import reset_peak, resident_memory

BLOCK = 64 * 2**20


def _touched_block() -> mmap.mmap:
    """64 MiB of fresh anonymous pages, written so they are resident.

    An anonymous mmap, not a numpy array: in a long pytest process malloc may serve an array from freed heap
    pages that are still resident, and then RSS does not move at all (CI saw exactly that)."""
    block = mmap.mmap(-1, BLOCK)
    for offset in range(0, BLOCK, mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_peak_follows_a_large_allocation_and_resets():
    before = resident_memory()
    assert before["rss_mb"] > 0 and before["peak_rss_mb"] >= before["rss_mb"] and before["anon_mb"] > 0
    block = _touched_block()
    during = resident_memory()
    assert during["rss_mb"] - before["rss_mb"] > 50 and during["peak_rss_mb"] >= during["rss_mb"]
    block.close()  # munmap: RSS falls, the peak stays until reset
    after = resident_memory()
    assert after["peak_rss_mb"] - after["rss_mb"] > 50
    assert reset_peak()
    assert resident_memory()["peak_rss_mb"] - resident_memory()["rss_mb"] < 20
