"""Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM (as `kill` and Kubernetes send it)
during `jobs/uptrain.py`: the run stops within a minute with exit 128 + signal and one line naming the last
good checkpoint, which stays the run's "latest" and is complete (every rank's state file)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_uptraining_stops_cleanly_and_keeps_the_last_checkpoint(make_config, tmp_path, signum):
    from rrt_ray import storage

    cfg = make_config("zero.stage=2", "optim.max_steps=100000", "run.checkpoint_every=3", "run.log_every=3",
                      "run.eval_every=0", "run.name=interrupted")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "jobs/uptrain.py", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    latest = Path(cfg.run.storage) / "interrupted" / "latest"
    try:
        deadline = time.monotonic() + 600
        while not (latest.is_file() and latest.read_text().strip() >= "step_00000006"):
            assert proc.poll() is None, f"uptrain exited {proc.returncode} before the signal:\n{proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint of step 6 within 600 s"
            time.sleep(0.2)
        started = psutil.Process(proc.pid).children(recursive=True)  # the local Ray cluster it started, its workers
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # a terminal's Ctrl-C reaches the whole foreground group, Ray's processes too
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    kept = storage.read_latest(str(latest.parent))
    lines = [line for line in err.splitlines() if line.startswith("uptrain:")]
    assert lines == [f"uptrain: interrupted by {signal.Signals(signum).name}: training stopped; the last good checkpoint "
                     f"is {kept} (rerun the same command to resume)"], err[-3000:]
    step = int(kept.rsplit("_", 1)[1])
    assert step >= 6 and step % 3 == 0
    assert {f"train_state_rank{rank}.json" for rank in (0, 1)} <= {p.name for p in Path(kept).iterdir()}
    assert not (Path(cfg.run.output) / "interrupted").exists()  # no export of a half-trained model
    _, alive = psutil.wait_procs(started, timeout=15)
    left = []
    for child in alive:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:  # this sandbox's init reaps orphans late
                left.append((child.pid, child.name()))
        except psutil.Error:
            continue
    assert not left, f"processes of the run left behind: {left}"
