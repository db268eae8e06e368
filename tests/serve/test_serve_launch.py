"""Finding the processes of a cluster we started, after Ray has renamed them (`rrt_ray.serve.launch`).

Ray's `setproctitle` writes "ray::Name" over the memory that held argv and the environment, so the owner
marker can vanish from /proc/PID/environ: the demo's Ray agents once outlived a Ctrl-C that way.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

from rrt_ray.serve.launch import OWNER_ENV, kill_owned, owned_processes

RENAMED_CHILD = """
import sys, time
import ray._raylet
log = open(sys.argv[1], "w")            # as a Ray process keeps its log file open under the temp dir
ray._raylet.setproctitle("ray::RenamedProbe")
print("ready", flush=True)
time.sleep(120)
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
