"""Stale DeepSpeed build locks (`rrt_ray.train.extensions`): a lock left by a killed build no longer hangs a run."""

from __future__ import annotations

import os
import threading
import time

from rrt_ray.train.extensions import clear_stale_build_locks


def _lock(root, op: str, age_s: float):
    folder = root / op
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_an_old_lock_is_removed_and_named(tmp_path):
    lock = _lock(tmp_path, "deepspeed_shm_comm", age_s=7200)
    lines: list[str] = []
    assert clear_stale_build_locks(tmp_path, stale_after_s=600, log=lines.append) == [lock]
    assert not lock.exists()
    assert str(lock) in lines[0] and "120 min old" in lines[0]


def test_a_live_build_is_waited_for_and_its_lock_left_to_it(tmp_path):
    lock = _lock(tmp_path / "py311_cpu", "cpu_adam", age_s=0)  # torch's default root: one level deeper
    released = threading.Timer(1.5, lock.unlink)  # the build finishes and releases its lock
    released.start()
    started = time.monotonic()
    assert clear_stale_build_locks(tmp_path, stale_after_s=600, log=print) == []
    assert time.monotonic() - started >= 1.4  # it waited for the release instead of removing a live lock
    released.join()


def test_no_locks_returns_at_once(tmp_path):
    (tmp_path / "deepspeed_shm_comm").mkdir()
    assert clear_stale_build_locks(tmp_path, stale_after_s=600) == []
