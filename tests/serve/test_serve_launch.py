"""Finding the processes of a cluster we started, after Ray has renamed them (`rrt_ray.serve.launch`).

Ray's `setproctitle` writes "ray::Name" over the memory that held argv and the environment, so the owner
marker can vanish from /proc/PID/environ: the demo's Ray agents once outlived a Ctrl-C that way.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

from polling import wait_for

from rrt_ray.serve.launch import OWNER_ENV, kill_owned, owned_processes

RENAMED_CHILD = """
import signal, sys
import ray._raylet
log = open(sys.argv[1], "w")            # as a Ray process keeps its log file open under the temp dir
ray._raylet.setproctitle("ray::RenamedProbe")
print("ready", flush=True)
signal.pause()                          # until the test or the code under test ends it
"""


def test_a_renamed_process_is_found_by_its_files_under_the_temp_dir_and_killed(tmp_path):
    owner = f"test-launch-{uuid.uuid4().hex[:12]}"
    env = {"PATH": "/usr/bin:/bin", OWNER_ENV: owner}  # a small environment: the rename blanks all of it
    child = subprocess.Popen([sys.executable, "-c", RENAMED_CHILD, str(tmp_path / "worker.out")], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert owned_processes(owner) == []  # the marker is gone: why the temp dir is the second sign
        assert [p.pid for p in owned_processes(owner, str(tmp_path))] == [child.pid]
        kill_owned(owner, grace_s=5.0, temp_dir=str(tmp_path))
        child.wait(timeout=10)  # ended by kill_owned (ray._raylet exits 0 on SIGTERM); a timeout here fails
        assert owned_processes(owner, str(tmp_path)) == []
    finally:
        child.kill()


def test_files_are_still_seen_once_the_temp_dir_is_removed(tmp_path):
    owner = f"test-launch-{uuid.uuid4().hex[:12]}"
    temp_dir = tmp_path / "ray-temp"
    temp_dir.mkdir()
    child = subprocess.Popen([sys.executable, "-c", RENAMED_CHILD, str(temp_dir / "worker.out")],
                             env={"PATH": "/usr/bin:/bin", OWNER_ENV: owner}, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        (temp_dir / "worker.out").unlink()
        temp_dir.rmdir()  # as a stopped head's cleanup does while a straggler still runs
        assert [p.pid for p in owned_processes(owner, str(temp_dir))] == [child.pid]
    finally:
        child.kill()


HARD_DYING_LAUNCHER = """
import os, subprocess, sys
from rrt_ray.serve.reaper import spawn_watchdog
owner, temp_dir, child_code = sys.argv[1], sys.argv[2], sys.argv[3]
spawn_watchdog(owner, temp_dir)
child = subprocess.Popen([sys.executable, "-c", child_code, os.path.join(temp_dir, "worker.out")],
                         env={"PATH": "/usr/bin:/bin", "RRT_SERVE_OWNER": owner}, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)  # holding no pipe of the test open
child.stdout.readline()
print(child.pid, flush=True)
os.abort()  # as Ray's signal handler can abort a driver mid-shutdown: no cleanup of ours runs
"""


def test_the_watchdog_stops_what_a_dead_launcher_left_and_removes_its_temp_dir(tmp_path):
    owner = f"test-launch-{uuid.uuid4().hex[:12]}"
    temp_dir = tmp_path / "ray-temp"
    temp_dir.mkdir()
    launcher = subprocess.run([sys.executable, "-c", HARD_DYING_LAUNCHER, owner, str(temp_dir), RENAMED_CHILD],
                              capture_output=True, text=True, timeout=60)
    assert launcher.returncode == -6, launcher.stderr
    child_pid = int(launcher.stdout.split()[0])
    try:
        wait_for(lambda: not owned_processes(owner, str(temp_dir)) and not temp_dir.exists(), 30,
                 f"the watchdog to stop child {child_pid} and remove {temp_dir}", poll=0.2)
    finally:
        for proc in owned_processes(owner, str(temp_dir)):  # never leave it running, even when the test fails
            proc.kill()
