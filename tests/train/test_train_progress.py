"""What a run shows while it runs: the log line (tokens/s, time left) and the TensorBoard events."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from rrt_ray.train.progress import EventLog, MetricWindow, format_duration, log_line


def _read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Parse TFRecord event files (u64 length, u32 crc, payload, u32 crc) with tensorboardX's protobufs."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        blob, offset = path.read_bytes(), 0
        while offset < len(blob):
            (length,) = struct.unpack("<Q", blob[offset:offset + 8])
            event = Event.FromString(blob[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_events_hold_every_reported_scalar(tmp_path):
    events = EventLog(str(tmp_path / "runs"), "demo", str(tmp_path / "work"), rank=0)
    for step in (10, 20):
        events.write({"step": step, "loss": 3.0 / step, "ce_loss": 2.5, "kd_loss": 0.5, "lr": 1e-3, "tokens_per_s": 1000.0 * step,
                      **({"heldout_loss": 2.0, "heldout_ppl": 7.39} if step == 20 else {})})
    events.close()
    scalars = _read_scalars(tmp_path / "runs" / "demo" / "tensorboard")
    assert scalars["train/loss"] == [(10, pytest.approx(0.3)), (20, pytest.approx(0.15))]
    assert scalars["train/tokens_per_s"] == [(10, 10000.0), (20, 20000.0)]
    assert scalars["train/heldout_loss"] == [(20, 2.0)] and [s for s, _ in scalars["train/kd_loss"]] == [10, 20]
    assert EventLog(str(tmp_path / "runs"), "other", str(tmp_path), rank=1).writer is None  # only rank 0 writes


def test_log_line_has_throughput_and_time_left():
    window = MetricWindow(("loss", "ce_loss", "kd_loss"))
    for _ in range(4):
        window.add({"loss": 2.0, "ce_loss": 3.0, "kd_loss": 1.0}, tokens=512)
    metrics = window.close(steps=2)
    assert metrics["loss"] == 2.0 and metrics["kd_loss"] == 1.0 and metrics["tokens_per_s"] > 0
    metrics.update(step=2, lr=1e-3, seconds_left=window.seconds_left(98))
    assert metrics["seconds_left"] > 0
    line = log_line("demo", metrics, stop_at=100)
    assert line.startswith("demo: step 2/100 | loss 2.0000 | ce 3.0000 | kd 1.0000") and "tokens/s" in line and " left" in line
    assert format_duration(75) == "1m15s" and format_duration(7300) == "2h01m"


def test_event_upload_outage_warns_and_catches_up(tmp_path, s3_server, monkeypatch, capsys):
    """The curves are not worth a run: with S3 down an event upload warns (the checkpoint upload right after
    is what fails the run, with its own message) and the next report after the outage uploads everything."""
    from rrt_ray.demo import free_port

    events = EventLog(s3_server.uri("runs"), "demo", str(tmp_path / "work"), rank=0)
    events.write({"step": 1, "loss": 2.0})
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    events.write({"step": 2, "loss": 1.5})
    assert "TensorBoard events not uploaded" in capsys.readouterr().out
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    events.write({"step": 3, "loss": 1.0})
    events.close()
    local = tmp_path / "bucket"
    for item in s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="runs/demo/tensorboard/")["Contents"]:
        (local / Path(item["Key"]).name).parent.mkdir(parents=True, exist_ok=True)
        s3_server.client().download_file(s3_server.bucket, item["Key"], str(local / Path(item["Key"]).name))
    assert [step for step, _ in _read_scalars(local)["train/loss"]] == [1, 2, 3]
