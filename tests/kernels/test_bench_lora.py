"""jobs/bench_lora.py runs end to end on a tiny grid and writes its report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

JOB = Path(__file__).resolve().parents[2] / "jobs" / "bench_lora.py"


def test_bench_job_writes_table(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_lora_job", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    tiny_grid = ["--tokens", "1", "5", "--depths", "2", "--ranks", "16", "--d-model", "64"]
    tiny_grid += ["--rounds", "1", "--passes", "1"]
    job.main([*tiny_grid, "--threads", str(torch.get_num_threads()), "--out", str(out), "--json", str(raw)])
    text = out.read_text()
    assert "python jobs/bench_lora.py --tokens 1 5" in text and "torch 2." in text
    assert "| 5 | 2 | 16 |" in text and "segmented" in text
    rows = json.loads(raw.read_text())["rows"]
    assert [r["num_tokens"] for r in rows] == [1, 5] and all(r["us"]["segmented"] > 0 for r in rows)
    assert all(r["us"]["segmented_grouped"] > 0 for r in rows)
    # Yardsticks are timed but never named fastest: their inputs differ from the contenders'.
    summary = text.split("## Summary")[1].split("## Results")[0]
    assert "- segmented:" in summary and "- segmented_grouped:" not in summary and "- one_depth:" not in summary
    assert all(not line.endswith(("| one_depth |", "| segmented_grouped |")) for line in text.splitlines())
