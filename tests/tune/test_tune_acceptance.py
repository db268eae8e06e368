"""Acceptance tests of issue 10 (slow), sharing one 4-trial sweep of a tiny model: `ray job submit` to a
local head, interrupted with `ray job stop` once a trial has finished, then the same command again.

The grid is init x lr with lr in {3e-3, 1.0}: the lr=1.0 arms diverge and must be stopped at their first
milestone. The head started here is stopped by the ids of its own processes (found by its private temp
dir), never with `ray stop`, which would stop every Ray cluster of the user on the machine.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
from polling import wait_for

# In CI (~8 min on 2 idle cores: 4 trials of which two stop at their first milestone, plus the stop and the resume).
# The module fixture runs the whole sweep inside the first test, hence its own timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
CORPUS_BYTES = 200_000  # as in conftest
TRIALS = ["t00-stepwise-8-0.003", "t01-stepwise-8-1", "t02-average-8-0.003", "t03-average-8-1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_processes_of(temp_dir: str) -> None:
    """Terminate the head's processes (their command lines name temp_dir) and their children."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.Error:
            continue
    for proc in found.values():
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(found.values()), timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


@contextmanager
def ray_head(env: dict[str, str]):
    """`ray start --head` (2 CPUs, dashboard on) on free ports with a private temp dir; yields its dashboard."""
    temp_dir = tempfile.mkdtemp(prefix="rrt-tune-head-", dir="/tmp")  # short: Unix socket paths are limited
    dashboard = _free_port()
    ports = {flag: _free_port() for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")}
    gcs = _free_port()
    command = [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2", "--disable-usage-stats",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}"]
    command += [f"{flag}={port}" for flag, port in ports.items()]
    # The head's processes inherit RAY_ADDRESS: Ray Train's PlacementGroupCleaner looks its cluster up without an
    # address and, with a second Ray instance on the machine (the session's ray_local), fails at once, leaking the
    # placement group of every trial ASHA stops (the next trial then waits for CPUs forever).
    started = subprocess.run(command, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _stop_processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(env, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_teacher):
    """Submit the sweep, stop the job once the second trial started, submit it again to completion."""
    import yaml

    root = tmp_path_factory.mktemp("sweep")
    config = {
        "train": {
            "model": {"teacher": tiny_teacher, "loops": 2},
            "data": {"source": "default", "max_bytes": CORPUS_BYTES, "seq_len": 32, "micro_batch_size": 4,
                     "eval_batches": 2, "cache_dir": str(root / "tokens")},
            "optim": {"warmup_steps": 1},
            "kd": {"weight": 0.5},
            "run": {"num_workers": 2, "workdir": str(root / "work")},
        },
        "space": {"model.init": ["stepwise", "average"], "model.lora_rank": [8], "optim.lr": [3.0e-3, 1.0]},
        "budget": {"tokens": 2048, "milestones": 2},
        "asha": {"grace_milestones": 1},
        "sweep": {"name": "accept", "storage": str(root / "runs"), "output": str(root / "out")},
    }
    path = root / "tune_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    entry = ["--working-dir", ".", "--", "python", "jobs/tune.py", "--config", str(path)]
    with ray_head(env) as address:
        first = _ray(env, "job", "submit", "--address", address, "--no-wait", *entry, timeout=120)
        assert first.returncode == 0, first.stderr[-2000:]
        job_id = re.search(r"raysubmit_\w+", first.stdout + first.stderr).group(0)

        def first_logs() -> str:
            return _ray(env, "job", "logs", "--address", address, job_id, timeout=60).stdout

        # t00 finished (exported) and t01 started: Tune has recorded t00 as terminated.
        wait_for(lambda: f"tune: {TRIALS[1]} started" in first_logs(), 900, "the second trial to start", poll=15)  # `ray job logs` costs a CPU-second
        stop = _ray(env, "job", "stop", "--address", address, job_id, timeout=120)
        assert stop.returncode == 0, stop.stderr[-2000:]
        def ended() -> bool:  # `ray job status` prints e.g. "Job 'raysubmit_...' was stopped" (on stdout or stderr)
            done = _ray(env, "job", "status", "--address", address, job_id, timeout=60)
            return any(word in (done.stdout + done.stderr).lower() for word in ("stopped", "failed", "succeeded"))

        wait_for(ended, 600, "the job to end", poll=15)
        interrupted_log = first_logs()
        second = _ray(env, "job", "submit", "--address", address, *entry)
    out = Path(config["sweep"]["output"]) / "accept"
    return {"config": config, "out": out, "logs": [interrupted_log, second.stdout], "second": second}


def _starts(log: str) -> list[str]:
    return re.findall(r"tune: (t\d\d\S*) started", log)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep):
    second = sweep["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    first_log, second_log = sweep["logs"]
    assert "tune: resuming sweep accept" in second_log
    finished_before = set(re.findall(r"tune: (t\d\d\S*) (?:finished|stopped early) at", first_log))
    assert TRIALS[0] in finished_before
    starts = _starts(first_log) + _starts(second_log)
    for trial in finished_before:
        assert starts.count(trial) == 1, (trial, starts)
    assert sorted(set(starts)) == TRIALS


def test_table_plot_and_best_model(sweep):
    from PIL import Image

    out = sweep["out"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["trial"] for r in rows] == TRIALS
    md = (out / "results.md").read_text()
    assert all(r["trial"] in md for r in rows) and "| heldout_loss |" in md
    for row in rows:
        assert int(row["params"]) > 0 and 0 < float(row["params_pct"]) < 100
        assert row["status"] in ("finished", "stopped early")
        assert math.isfinite(float(row["wall_s"]))
    good = [r for r in rows if float(r["lr"]) < 0.1 and r["status"] == "finished"]
    assert good[0]["trial"] == TRIALS[0]  # ASHA never stops the first trial to reach a rung
    assert all(int(r["tokens_seen"]) == 2048 and math.isfinite(float(r["heldout_loss"])) for r in good)
    assert any(r["pareto"] == "*" for r in good)
    with Image.open(out / "results.png") as image:
        image.load()
        assert image.size[0] > 300 and image.size[1] > 200
    assert list((out / "tensorboard").glob(f"{TRIALS[0]}/events.out.tfevents.*"))

    summary = json.loads((out / "summary.json").read_text())
    best = min(good, key=lambda r: float(r["heldout_loss"]))
    assert summary["best"]["trial"] == best["trial"]
    assert (out / "best" / "latest").read_text().strip() == best["trial"]
    loss = _plain_heldout_loss(str(out / "best" / best["trial"]), sweep["config"])
    assert abs(loss - float(best["heldout_loss"])) / float(best["heldout_loss"]) < 1e-4, (loss, best["heldout_loss"])


def test_bad_lr_arm_is_stopped_early_below_its_budget(sweep):
    rows = list(csv.DictReader((sweep["out"] / "results.csv").open()))
    bad = [r for r in rows if float(r["lr"]) == 1.0]
    assert len(bad) == 2
    for row in bad:
        assert row["status"] == "stopped early", row
        assert int(row["tokens_seen"]) < int(row["tokens_budget"]) == 2048
        assert row["note"].startswith("diverged")


def _plain_heldout_loss(model_dir: str, config: dict) -> float:
    """Mean next-token cross-entropy of the exported model over the sweep's held-out set: the first
    eval_batches x micro_batch_size x num_workers windows of seq_len + 1 tokens of the held-out split."""
    import numpy as np

    import rrt_ray  # noqa: F401  registers the recursive model with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrt_ray import data

    train = config["train"]
    seq_len = train["data"]["seq_len"]
    count = train["data"]["eval_batches"] * train["data"]["micro_batch_size"] * train["run"]["num_workers"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = data.tokenize_texts(data.load_texts("default", "heldout", CORPUS_BYTES), tokenizer).astype(np.int64)
    windows = torch.from_numpy(np.stack([tokens[i * seq_len: i * seq_len + seq_len + 1] for i in range(count)]))  # (N, L+1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits  # (N, L, V)
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
