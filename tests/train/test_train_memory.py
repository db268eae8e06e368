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


TRIM_PROBE = """
import ctypes
from rrt_ray.train.memory import release_free_heap, resident_memory

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 << 10) for _ in range(1024)]
for block in blocks:
    ctypes.memset(block, 1, 64 << 10)
pin = libc.malloc(64 << 10)  # the heap's top, above the blocks
ctypes.memset(pin, 1, 64 << 10)
for block in blocks:
    libc.free(block)
before = resident_memory()["rss_mb"]
assert release_free_heap()
print(before - resident_memory()["rss_mb"])
"""


def test_release_free_heap_returns_freed_heap_pages():
    """64 MiB of 64 KiB blocks (under glibc's mmap threshold: from the heap), freed under one live block that
    keeps the heap's top: free() alone cannot shrink the heap, so the pages stay resident until trimmed. In a
    fresh process, whose heap has no holes a long test process could put the pin in."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True)
    assert float(done.stdout) > 40, done.stdout


def test_trim_heap_follows_the_config(monkeypatch):
    from rrt_ray.train import loop
    from rrt_ray.train.config import TrainConfig

    calls = []
    monkeypatch.setattr(loop, "release_free_heap", lambda: calls.append(1) or True)
    loop.trim_heap(TrainConfig.load(None, ["model.teacher=t", "run.trim_heap=false"]))
    assert calls == []
    loop.trim_heap(TrainConfig.load(None, ["model.teacher=t", "run.trim_heap=true"]))
    assert calls == [1]


MMAP_PROBE = """
import ctypes, sys
from rrt_ray.train.memory import resident_memory, set_mmap_threshold

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
assert set_mmap_threshold(int(sys.argv[1]))
blocks = [libc.malloc(2 << 20) for _ in range(32)]
for block in blocks:
    ctypes.memset(block, 1, 2 << 20)
pin = libc.malloc(2 << 20)  # above the blocks when they come from the heap: free() alone cannot shrink it
before = resident_memory()["rss_mb"]
for block in blocks:
    libc.free(block)
print(before - resident_memory()["rss_mb"])
"""


def test_mmap_threshold_returns_freed_blocks_to_the_os():
    """A fresh process per setting (it lasts the life of a process, and malloc serves from freed heap chunks
    before it maps new ones): 64 MiB of 2 MiB blocks stay resident after free() with a 32 MiB threshold (the
    heap) and leave at once with a 1 MiB threshold (each its own mmap)."""
    import subprocess
    import sys

    def drop(threshold: int) -> float:
        return float(subprocess.run([sys.executable, "-c", MMAP_PROBE, str(threshold)], capture_output=True, text=True, check=True).stdout)

    heap_drop, mmap_drop = drop(32 << 20), drop(1 << 20)
    assert heap_drop < 16 and mmap_drop > 56, (heap_drop, mmap_drop)


def test_bench_train_memory_bad_arguments_exit_2(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "jobs" / "bench_train_memory.py"
    for argv, message in ((["--arms", "chunked,bogus"], "unknown arm(s) bogus; allowed: whole, chunked, chunked+gc"),
                          ([], f"--teacher {tmp_path}: not a Hugging Face model directory (no config.json)")):
        done = subprocess.run([sys.executable, str(bench), "--teacher", str(tmp_path), *argv], capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr
