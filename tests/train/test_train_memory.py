"""rrt_ray/train/memory.py: this process's resident memory from /proc (Linux, as on every machine here)."""

import numpy as np

from rrt_ray.train.memory import reset_peak, resident_memory


def test_peak_follows_a_large_allocation_and_resets():
    before = resident_memory()
    assert before["rss_mb"] > 0 and before["peak_rss_mb"] >= before["rss_mb"] and before["anon_mb"] > 0
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    during = resident_memory()
    assert during["rss_mb"] - before["rss_mb"] > 50 and during["peak_rss_mb"] >= during["rss_mb"]
    del block  # numpy frees this size with munmap: RSS falls, the peak stays until reset
    after = resident_memory()
    assert after["peak_rss_mb"] - after["rss_mb"] > 50
    assert reset_peak()
    assert resident_memory()["peak_rss_mb"] - resident_memory()["rss_mb"] < 20
