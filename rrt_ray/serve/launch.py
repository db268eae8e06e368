"""Run the Serve app from one process that owns everything it starts (`jobs/serve.py` is its CLI).

    with ServeLauncher(config, host, port, address=None) as launcher:   # a private local Ray cluster
        launcher.start(timeout_s=300)                                   # deploy, wait for /healthz
        launcher.wait()                                                 # until SIGINT / SIGTERM

Stopping is the point of this module: SIGINT or SIGTERM at any moment (during `ray.init`, while replicas
load, or after ready) raises `Stopped` in the main thread, and leaving the `with` block takes the
cluster down within seconds. Every process of a cluster this launcher started carries the environment
marker OWNER_ENV (Ray's processes inherit the driver's environment), so after `ray.shutdown()` a sweep
kills whatever of ours is left (a replica still loading its model, a worker still exiting) and nothing
else: never `ray stop`, which would stop every Ray cluster of the user on the host. Connected to an
existing cluster (`address`), it deletes its own application only.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
import uuid

OWNER_ENV = "RRT_SERVE_OWNER"
APP_NAME = "rrt"


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, so that no `except Exception` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, _frame) -> None:
    raise Stopped(signum)


def install_stop_handlers() -> None:
    """SIGINT and SIGTERM raise Stopped (ray.init replaces the SIGTERM handler: call again after it)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a background job ignores SIGINT: SIGTERM stops it too
        signal.signal(sig, _raise_stopped)


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


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


def wait_healthy(url: str, timeout_s: float) -> None:
    """Port 8000 accepts before the replicas are ready: poll /healthz with short timeouts."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s")


class ServeLauncher:
    def __init__(self, config, host: str, port: int, address: str | None = None, num_cpus: float | None = None) -> None:
        self.config, self.host, self.port, self.address, self.num_cpus = config, host, port, address, num_cpus
        self.url = f"http://{host}:{port}"
        self.owner = os.environ.setdefault(OWNER_ENV, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
        self._temp_dir: str | None = None
        self._ray_started = False

    def __enter__(self) -> "ServeLauncher":
        install_stop_handlers()
        return self

    def start(self, timeout_s: float) -> None:
        """Start on a helper thread while the main thread waits: `ray.init` can sit in C code for long
        stretches (tens of seconds on a loaded machine), where a signal handler would never run."""
        failure: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                self._start(timeout_s)
            except BaseException as err:  # noqa: BLE001  (handed to the main thread)
                failure.append(err)
            finally:
                done.set()

        threading.Thread(target=run, name="rrt-serve-start", daemon=True).start()
        while not done.wait(0.2):  # signal handlers run between these waits
            pass
        if failure:
            raise failure[0]

    def _start(self, timeout_s: float) -> None:
        import ray
        from ray import serve

        from rrt_ray.serve.app import build_application

        if self.address:
            ray.init(address=self.address, include_dashboard=False)
        else:  # a private cluster: its own temp dir (sockets, logs) and free ports, stopped on exit
            self._temp_dir = tempfile.mkdtemp(prefix="rrt-serve-")
            ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, _temp_dir=self._temp_dir)
        self._ray_started = True
        serve.start(http_options={"host": self.host, "port": self.port})
        serve.run(build_application(self.config), name=APP_NAME, route_prefix="/", blocking=False)
        wait_healthy(self.url, timeout_s)

    def wait(self) -> None:
        while True:
            time.sleep(3600)

    def __exit__(self, *exc) -> None:
        _ignore_stop_signals()  # a second Ctrl-C must not cut the cleanup short
        try:
            self._stop()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _stop(self) -> None:
        import ray

        if self.address and self._ray_started:
            try:
                from ray import serve

                serve.delete(APP_NAME, _blocking=False)
            finally:
                ray.shutdown()
            return
        if ray.is_initialized():  # stops the raylet and GCS this driver started; bounded: on a loaded
            stopper = threading.Thread(target=ray.shutdown, daemon=True)  # machine it can take long
            stopper.start()
            stopper.join(timeout=4.0)
        # What is left of ours (never another cluster's processes), swept until none is left: while the raylet
        # or the Serve controller still lives it can start a replica or worker in the middle of a sweep.
        deadline, grace = time.monotonic() + 5.0, 1.5
        while owned_processes(self.owner, self._temp_dir) and time.monotonic() < deadline:
            kill_owned(self.owner, grace_s=grace, temp_dir=self._temp_dir)
            grace = 0.5
            time.sleep(0.2)
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
