"""What a training run reports while it runs: loss means over every worker, tokens/s, time remaining.

`MetricWindow` sums the loss terms of the micro-batches since the last report (one float64 vector, so one
all-reduce makes them means over every worker, not rank 0's share) and times the window. The first window
of each attempt holds the warm-up (first forward, JIT compiles, allocator growth): it is left out of the
steady tokens/s and of the time-remaining estimate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


class MetricWindow:
    """Loss sums, tokens and wall time since the last report."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.sums = torch.zeros(len(names) + 1, dtype=torch.float64)  # (each term, micro-batches)
        self.start, self.tokens, self.steps = time.perf_counter(), 0, 0
        self.steady_tokens, self.steady_seconds, self.steady_steps, self.windows = 0, 0.0, 0, 0

    def add(self, terms: dict[str, torch.Tensor], tokens: int) -> None:
        """One micro-batch: its loss terms (scalars) and the tokens it held on all workers."""
        # detached: the terms are the graph's own tensors (float() on them warns once per worker and run)
        self.sums += torch.tensor([float(torch.as_tensor(terms[name]).detach()) for name in self.names] + [1.0], dtype=torch.float64)
        self.tokens += tokens

    def close(self, steps: int) -> dict[str, float]:
        """The window's metrics (a collective when a process group exists); starts the next window."""
        if dist.is_initialized():
            dist.all_reduce(self.sums)
        elapsed = time.perf_counter() - self.start
        self.steps += steps
        if self.windows > 0:  # the first window of an attempt is warm-up
            self.steady_tokens += self.tokens
            self.steady_seconds += elapsed
            self.steady_steps += steps
        self.windows += 1
        count = max(1.0, self.sums[-1].item())
        metrics = {name: (self.sums[i] / count).item() for i, name in enumerate(self.names)}
        metrics["tokens_per_s"] = self.tokens / elapsed
        metrics["tokens_per_s_mean"] = self.steady_tokens / self.steady_seconds if self.steady_seconds else self.tokens / elapsed
        self._seconds_per_step = self.steady_seconds / self.steady_steps if self.steady_steps else elapsed / max(1, steps)
        self.sums.zero_()
        self.start, self.tokens = time.perf_counter(), 0
        return metrics

    def seconds_left(self, steps_left: int) -> float:
        """Time to run steps_left more optimizer steps at this attempt's steady pace (call after close)."""
        return steps_left * self._seconds_per_step


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def log_line(name: str, metrics: dict[str, Any], stop_at: int) -> str:
    """One human line per report: step, losses, lr, throughput, time remaining."""
    parts = [f"{name}: step {metrics['step']}/{stop_at}", f"loss {metrics['loss']:.4f}", f"ce {metrics['ce_loss']:.4f}"]
    if metrics.get("kd_loss"):
        parts.append(f"kd {metrics['kd_loss']:.4f}")
    if "heldout_loss" in metrics:
        parts.append(f"held-out loss {metrics['heldout_loss']:.4f} (ppl {metrics['heldout_ppl']:.2f})")
    parts += [f"lr {metrics['lr']:.3g}", f"{metrics['tokens_per_s']:,.0f} tokens/s"]
    if metrics.get("peak_rss_mb"):
        parts.append(f"peak RSS {metrics['peak_rss_mb'] / 1024:.2f} GiB/worker")
    parts.append(f"{format_duration(metrics['seconds_left'])} left")
    return " | ".join(parts)


EVENT_SCALARS = ("loss", "ce_loss", "kd_loss", "final_ce_loss", "heldout_loss", "heldout_ppl", "lr", "tokens_per_s", "peak_rss_mb")
EVENTS_DIR = "tensorboard"


class EventLog:
    """TensorBoard events of a run, written by rank 0 under `<run.storage>/<run.name>/tensorboard`
    (`tensorboard --logdir <run.storage>`). With s3:// storage the events are written to the worker's
    scratch and uploaded at every report, so the bucket always holds the curves so far."""

    def __init__(self, storage_root: str, name: str, workdir: str, rank: int) -> None:
        from rrt_ray import storage

        self.writer, self.remote = None, None
        if rank != 0:
            return
        from tensorboardX.event_file_writer import EventsWriter

        run_dir = storage.join(storage_root, name, EVENTS_DIR)
        if storage.is_remote(run_dir):
            self.remote, local = run_dir, Path(workdir).expanduser() / EVENTS_DIR / name
        else:
            local = Path(run_dir).expanduser()
        local.mkdir(parents=True, exist_ok=True)
        self.local = local
        # The synchronous writer under SummaryWriter: SummaryWriter queues events to a thread, and its flush()
        # does not wait for the queue, so an upload right after it missed the newest report.
        self.writer = EventsWriter(str(local / "events"))

    def write(self, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for key in EVENT_SCALARS:
            if metrics.get(key) is not None:
                summary = scalar(f"train/{key}", float(metrics[key]))
                self.writer.write_event(Event(wall_time=time.time(), step=metrics["step"], summary=summary))
        self.writer.flush()
        if self.remote is not None:
            self.upload()

    def upload(self) -> None:
        """Copy the local event files to the bucket. A failed upload warns and is retried at the next report:
        the curves are not worth a run, and the checkpoint upload right after reports an outage properly."""
        from rrt_ray import storage

        try:
            for path in self.local.iterdir():
                storage.write_bytes(storage.join(self.remote, path.name), path.read_bytes())
        except storage.StorageError as error:
            print(f"warning: TensorBoard events not uploaded to {self.remote} (retried at the next report): {error}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
