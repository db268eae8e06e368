"""Run the Serve app from one process that owns everything it starts (`jobs/serve.py` is its CLI).

    with ServeLauncher(config, host, port, address=None) as launcher:   # a private local Ray cluster
        launcher.start(timeout_s=300)                                   # deploy, wait for /healthz
        launcher.wait()                                                 # until SIGINT / SIGTERM

Stopping is the point of this module: SIGINT or SIGTERM at any moment (during `ray.init`, while replicas
load, or after ready) raises `Stopped` in the main thread, and leaving the `with` block takes the
cluster down within seconds. Every process of a cluster this launcher started carries the environment
marker OWNER_ENV (Ray's processes inherit the driver's environment), so after `ray.shutdown()` a sweep
kills whatever of ours is left (a replica still loading its model, a worker still exiting) and nothing
else: never `ray stop`, which would stop every Ray cluster of the user on the host. A watchdog process
(`rrt_ray.serve.reaper`) does the same sweep if the launcher dies before it can. Connected to an existing
cluster (`address`), it deletes its own application only.
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

from rrt_ray.serve.reaper import OWNER_ENV, kill_owned, owned_processes, spawn_watchdog, sweep

APP_NAME = "rrt"
__all__ = ["OWNER_ENV", "APP_NAME", "ServeLauncher", "Stopped", "install_stop_handlers", "kill_owned", "owned_processes"]


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
        self._watchdog = None
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
            self._watchdog = spawn_watchdog(self.owner, self._temp_dir)
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
        sweep(self.owner, self._temp_dir)  # what is left of ours, never another cluster's processes
        if self._watchdog is not None:  # done its job here; it is only for a launcher that dies before this
            self._watchdog.terminate()
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
