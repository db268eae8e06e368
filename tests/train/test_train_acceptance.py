"""Acceptance tests of issue 4 (slow): `ray job submit` to a local head with checkpoints on an S3 server,
a training worker killed mid-run, and the S3 server stopped during a checkpoint upload.

The S3 server is moto's, on 127.0.0.1 with dummy keys. The head started here is stopped by the ids of its
own processes (found by its private temp dir), never with `ray stop`, which would stop every Ray cluster
of the user on the machine.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch
from polling import wait_for

pytestmark = pytest.mark.slow
BUCKET = "rrt-test"
VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
CORPUS_BYTES = 200_000  # as in conftest.make_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 server on 127.0.0.1 with a bucket; AWS_* variables point this process at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    state = {"server": server, "port": port, "env": env}
    yield state
    state["server"].stop()


@contextmanager
def ray_head(env: dict[str, str]):
    """`ray start --head` on free ports with a private temp dir; yields the dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="rrt-head-", dir="/tmp")  # short: Unix socket paths are limited
    dashboard = _free_port()
    ports = {flag: _free_port() for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")}
    command = [str(VENV_BIN / "ray"), "start", "--head", "--port=0", "--num-cpus=2", "--disable-usage-stats",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}"]
    command += [f"{flag}={port}" for flag, port in ports.items()]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _stop_processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


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


def _heldout_ppl(model_dir: str, tokenizer_dir: str, seq_len: int = 32, batches: int = 8) -> float:
    import rrt_ray  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrt_ray import data
    from rrt_ray.train.losses import cross_entropy

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens = data.tokenize_texts(data.load_texts("default", "heldout", CORPUS_BYTES), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(data.iter_eval_batches(tokens, seq_len, 4)):
            if i == batches:
                break
            losses.append(cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"]).item())
    return math.exp(sum(losses) / len(losses))


@pytest.fixture(scope="session")
def pretrained_tiny_teacher(ray_local, tmp_path_factory) -> str:
    """A tiny Llama pretrained through the pretrain recipe (held-out perplexity ~110 vs ~500 at init)."""
    from rrt_ray.train.pretrain import PretrainConfig, pretrain_teacher

    root = tmp_path_factory.mktemp("pretrain")
    cfg = PretrainConfig.load(None, [
        "arch.vocab_size=512", "arch.hidden_size=64", "arch.intermediate_size=128", "arch.num_layers=8",
        "arch.num_heads=4", "arch.num_kv_heads=2", "arch.max_position_embeddings=256",
        "kd.weight=0", "data.source=default", f"data.max_bytes={CORPUS_BYTES}", "data.seq_len=32",
        "data.micro_batch_size=8", "data.eval_batches=2", f"data.cache_dir={root / 'tokens'}",
        "optim.lr=1e-2", "optim.warmup_steps=10", "optim.max_steps=300",
        f"run.storage={root / 'runs'}", f"run.output={root / 'teacher'}", f"run.workdir={root / 'work'}",
        "run.checkpoint_every=0", "run.log_every=20", "run.eval_every=0",
    ])
    uri = pretrain_teacher(cfg, log=lambda line: None)
    assert pretrain_teacher(cfg, log=lambda line: None) == uri  # cached by content: no second run
    return uri


def test_job_submit_zero2_kd_s3_beats_converted_model(s3_server, pretrained_tiny_teacher, tmp_path):
    """`ray job submit` to a local head: 2 workers, ZeRO-2, KD, checkpoints and export on S3."""
    from rrt_ray import storage

    env = {**os.environ, **s3_server["env"], "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    args = [
        "--config", "jobs/configs/demo.yaml",
        f"model.teacher={pretrained_tiny_teacher}", "model.student=", "model.lora_rank=0",
        f"data.max_bytes={CORPUS_BYTES}", "data.seq_len=32", "data.micro_batch_size=8", "data.eval_batches=2",
        f"data.cache_dir={tmp_path / 'tokens'}",
        "optim.lr=1e-3", "optim.warmup_steps=2", "optim.max_steps=30",
        "zero.stage=2", "kd.weight=0.5", "kd.loss=forward_kl", "run.num_workers=2", "run.name=submitted",
        f"run.storage=s3://{BUCKET}/runs", f"run.output=s3://{BUCKET}/models", f"run.workdir={tmp_path / 'work'}",
        "run.checkpoint_every=10", "run.eval_every=10", "run.log_every=10",
    ]
    with ray_head(env) as address:
        job = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--", "python", "jobs/uptrain.py", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "uptrain: done" in job.stdout

    assert storage.read_latest(f"s3://{BUCKET}/runs/submitted") == f"s3://{BUCKET}/runs/submitted/step_00000030"
    assert storage.read_latest(f"s3://{BUCKET}/models") == f"s3://{BUCKET}/models/submitted"
    exported = tmp_path / "exported"
    storage.download_dir(f"s3://{BUCKET}/models/submitted", str(exported))  # checksums verified
    converted = next((tmp_path / "work").glob("converted-*"))
    ppl_exported = _heldout_ppl(str(exported), str(exported))
    ppl_converted = _heldout_ppl(str(converted), str(exported))
    # Measured: converted ~175, uptrained ~113 (teacher ~109): a plain recursive model recovers most of the gap.
    assert ppl_exported < 0.9 * ppl_converted, f"uptrained {ppl_exported:.1f} vs converted {ppl_converted:.1f}"


def _run_in_thread(target, *args):
    box: dict = {}

    def run():
        try:
            box["result"] = target(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_killed_worker_resumes_and_matches_uninterrupted_run(ray_local, make_config, weights, fit_killing_a_worker):
    """(The same from a token set streamed from S3: tests/train/test_train_token_sets.py.)"""
    from rrt_ray.train.trainer import fit

    common = ["zero.stage=2", "data.seq_len=64", "optim.max_steps=40", "run.checkpoint_every=5",
              "run.log_every=5", "run.eval_every=20", "run.max_failures=2"]
    straight = fit(make_config(*common, "run.name=ft-straight"))
    resumed = fit_killing_a_worker(make_config(*common, "run.name=ft-killed"), after_step=10)

    assert resumed["step"] == 40
    assert resumed["data_fingerprint"] == straight["data_fingerprint"]  # no batch lost or repeated
    a, b = weights(straight["export_uri"]), weights(resumed["export_uri"])
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"final weights differ from the uninterrupted run by {worst}"
    assert resumed["loss"] == pytest.approx(straight["loss"], abs=1e-6)


def test_s3_down_during_checkpoint_upload_keeps_latest(ray_local, make_config, s3_server):
    from moto.server import ThreadedMotoServer

    from rrt_ray import storage
    from rrt_ray.train.trainer import fit

    root = f"s3://{BUCKET}/outage"
    cfg = make_config("zero.stage=2", "data.seq_len=64", "optim.max_steps=200", "run.checkpoint_every=5",
                      "run.log_every=5", "run.eval_every=0", "run.max_failures=0", "run.name=outage",
                      f"run.storage={root}")
    thread, box = _run_in_thread(fit, cfg)
    wait_for(lambda: storage.read_latest(f"{root}/outage") is not None, 300, "the first checkpoint on S3")
    s3_server["server"].stop()  # the next checkpoint upload hits a dead endpoint
    thread.join(timeout=600)
    assert not thread.is_alive(), "the job neither failed nor finished with S3 down"
    assert "error" in box, "the job finished although S3 was down"
    message = str(box["error"])
    assert "checkpoint upload" in message and "latest" in message, message

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_server["port"], verbose=False)
    server.start()
    s3_server["server"] = server
    latest = storage.read_latest(f"{root}/outage")
    files = storage.list_dir(latest)
    assert {"train_state_rank0.json", "train_state_rank1.json"} <= {Path(f).name for f in files}, files
    step = int(latest.rsplit("_", 1)[1])
    assert step % 5 == 0 and step < 200
