"""`make demo` interrupted with Ctrl-C in the middle (while the teacher pretrains on Ray Train workers)
exits promptly and leaves none of the Ray processes it started (issue 14 item 3).

The demo's processes are found three ways: the owner marker in their environment (the demo's head and
everything under it inherit RRT_SERVE_OWNER, which the test chooses), files they hold under the demo's
private Ray temp dir (Ray's renaming can blank the marker) and that temp dir in their command lines.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from rrt_ray.serve.launch import owned_processes

REPO = Path(__file__).resolve().parents[1]


def _ours(owner: str, temp_dir: str | None) -> list[psutil.Process]:
    # The launcher's own finder (owner marker, files under the temp dir) plus the temp dir in command lines.
    found = {p.pid: p for p in owned_processes(owner, temp_dir)}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir and any(temp_dir in a for a in proc.info["cmdline"] or []):
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    return list(found.values())


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float, seen: list[str]) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f}s; output:\n{''.join(seen[-40:])}")


@pytest.mark.slow
def test_sigint_mid_demo_stops_everything_it_started(tmp_path):
    owner = f"test-demo-{uuid.uuid4().hex[:12]}"
    # A user's shell, not this process's: earlier tests' Ray, S3 and serve settings (ray.init sets RAY_* here) stay out.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "RRT_"))}
    env = {**clean, "RRT_SERVE_OWNER": owner, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "jobs/demo.py", "--quick", "--workdir", str(tmp_path / "demo")]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        temp_dir = _read_until(proc, r"temp dir (\S+)", 240, seen).group(1)
        _read_until(proc, r"\[demo\] == teacher", 120, seen)
        time.sleep(20)  # into the stage: the pretraining run's workers are starting or running
        if proc.poll() is not None:  # it died on its own: show why (the rest of its output is still in the pipe)
            raise AssertionError(f"the demo exited {proc.returncode} before the SIGINT:\n" + "".join(seen[-40:]) + proc.stdout.read()[-6000:])
        assert len(_ours(owner, temp_dir)) >= 3, "the demo's Ray head should be running"
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        rest, _ = proc.communicate(timeout=90)  # promptly: Ray's shutdown plus a 5 s grace to kill the rest
        seen.append(rest)
        assert time.monotonic() - sent < 90
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(seen)
    # 130 from the demo's own handler; Ray Train's fit() installs its own SIGINT handler while it runs and
    # aborts the run with an error instead (exit 1): either way the demo must stop and clean up.
    assert proc.returncode in (130, 1), output[-3000:]
    assert "Ray head stopped; 0 of its processes left" in output, output[-3000:]
    time.sleep(1)
    left = _ours(owner, temp_dir)
    assert not left, f"processes left: {[(p.pid, p.name()) for p in left]}"


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-7b"], "--model 'llama-7b' is not a packaged model; allowed: smollm2-135m"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_bad_demo_arguments_exit_2_with_one_line(argv, message):
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "demo.py"), *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [f"demo: error: {message}"]
