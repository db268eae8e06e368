"""The sweep's outputs on s3:// (moto's S3 server over HTTP): table, plot, summary and the best model behind
an atomic `latest` marker, from a trial's export on S3 (no Ray: the rows are built as the runner's are)."""

from __future__ import annotations

import io
import json
import socket

import pytest

BUCKET = "rrt-tune"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield
    server.stop()


def test_outputs_and_best_model_on_s3(s3, sweep_config, tiny_teacher, tmp_path):
    from PIL import Image
    from transformers import AutoModelForCausalLM

    from rrt_ray import storage
    from rrt_ray.tune import results
    from rrt_ray.tune.config import TuneConfig
    from rrt_ray.tune.sweep import plan_sweep, write_outputs

    path, _ = sweep_config({"model.init": ["stepwise", "average"]}, sweep={"output": f"s3://{BUCKET}/sweeps"})
    cfg = TuneConfig.load(path)
    plans, _ = plan_sweep(cfg)
    storage.upload_dir(tiny_teacher, f"s3://{BUCKET}/sweeps/tiny/trials/{plans[1].name}")  # stands in for the trial's export
    finished = {"tokens_seen": 2048, "loss": 5.0, "time_total_s": 1.0}
    rows = [
        results.trial_row(plans[0], {**finished, "heldout_loss": 5.2, "export_uri": f"s3://{BUCKET}/nowhere"}, None, 2048, 9.0),
        results.trial_row(plans[1], {**finished, "heldout_loss": 5.1, "export_uri": f"s3://{BUCKET}/sweeps/tiny/trials/{plans[1].name}"}, None, 2048, 9.0),
    ]
    results.mark_pareto(rows)
    staging = tmp_path / "staging"
    staging.mkdir()
    summary = write_outputs(cfg, rows, plans, 123.0, str(staging))

    out = f"s3://{BUCKET}/sweeps/tiny"
    assert summary["best"]["trial"] == plans[1].name
    assert storage.read_latest(f"{out}/best") == f"{out}/best/{plans[1].name}"
    assert json.loads(storage.read_text(f"{out}/summary.json"))["teacher_heldout_ppl"] == 123.0
    assert storage.read_text(f"{out}/results.csv").count("\n") == 3
    with Image.open(io.BytesIO(storage.read_bytes(f"{out}/results.png"))) as image:
        image.load()
    local = tmp_path / "best"
    storage.download_dir(storage.read_latest(f"{out}/best"), str(local))  # checksums verified
    AutoModelForCausalLM.from_pretrained(str(local))
