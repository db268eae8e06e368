"""Finding and stopping the processes of a Ray cluster we started, and a watchdog that does it once we are gone.

Every process of a cluster rrt-ray starts carries the environment marker OWNER_ENV (Ray's processes inherit
the driver's environment) and keeps its log files open under the cluster's private --temp-dir; either finds
it, and nothing else: never `ray stop`, which would stop every Ray cluster of the user on the host.

The launcher's own cleanup runs in the launcher, and cannot when it dies hard: Ray's C++ signal handler can
abort a driver that gets SIGTERM during `ray.shutdown` (exit -6), and the kernel's OOM killer asks nobody.
Ray's agents then outlive it by minutes. So the launcher also starts this file as a script (stdlib and psutil
only: no torch import), which waits for the launcher's pid and then stops what is left:

    python reaper.py LAUNCHER_PID OWNER TEMP_DIR
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

OWNER_ENV = "RRT_SERVE_OWNER"


def environ(proc) -> dict[str, str]:
    """A psutil process's environment, as far as /proc still shows it. Ray names its processes
    ("ray::DashboardAgent") by writing over the memory that held argv and the environment: the start of
    /proc/PID/environ is blanked (all of it, for a small environment), and psutil's parser stops at the first
    empty entry and returns {}. Read the raw block and skip the blanks; see `owned_processes` for the rest."""
    try:
        with open(f"/proc/{proc.pid}/environ", "rb") as block:
            raw = block.read()
    except FileNotFoundError:  # no /proc (macOS): psutil asks the kernel another way
        return proc.environ()
    return dict(entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0") if "=" in entry)


def _holds_file_under(proc, temp_dir: str) -> bool:
    # Every Ray process keeps its log files open under the cluster's --temp-dir. /proc/PID/fd still names
    # them once the dir is removed ("... (deleted)"), where psutil's open_files() no longer lists them.
    fd_dir = f"/proc/{proc.pid}/fd"
    if not os.path.isdir(fd_dir):  # no /proc (macOS)
        return any(f.path.startswith(temp_dir) for f in proc.open_files())
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)).startswith(temp_dir):
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def owned_processes(owner: str, temp_dir: str | None = None) -> list:
    """psutil processes (other than this one) that carry OWNER_ENV=owner in their environment or, when the
    cluster's private `temp_dir` is given, hold a file under it: a renamed Ray process may have lost the
    marker (see `environ`), never its log files."""
    import psutil

    temp_dir = temp_dir and os.path.join(os.path.realpath(temp_dir), "")
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            # A zombie has exited and holds nothing; this sandbox's init reaps orphans late.
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if environ(proc).get(OWNER_ENV) == owner or (temp_dir and _holds_file_under(proc, temp_dir)):
                found.append(proc)
        except (psutil.Error, OSError):  # gone, or another user's process
            continue
    return found


def kill_owned(owner: str, grace_s: float = 2.0, temp_dir: str | None = None) -> None:
    import psutil

    procs = owned_processes(owner, temp_dir)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def sweep(owner: str, temp_dir: str | None, timeout_s: float = 5.0) -> None:
    """Kill what is left of ours until none is left (a raylet still alive can start a worker mid-sweep)."""
    deadline, grace = time.monotonic() + timeout_s, 1.5
    while owned_processes(owner, temp_dir) and time.monotonic() < deadline:
        kill_owned(owner, grace_s=grace, temp_dir=temp_dir)
        grace = 0.5
        time.sleep(0.2)


def spawn_watchdog(owner: str, temp_dir: str) -> subprocess.Popen:
    """This file as a script, watching the calling process; without the owner marker, so no sweep kills it."""
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid()), owner, temp_dir], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # a Ctrl-C to the launcher's process group is not for it


def _watch(launcher_pid: int, owner: str, temp_dir: str) -> None:
    import psutil

    try:
        psutil.Process(launcher_pid).wait()
    except psutil.NoSuchProcess:
        pass
    sweep(owner, temp_dir, timeout_s=10.0)
    shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2], sys.argv[3])
