"""The quality study's training-arm pieces (rrt_ray/quality_uptrain.py) on the tiny models: the truncated
baseline, the early-exit mix by threshold, and bench_quality's bad arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rrt_ray import quality_uptrain

REPO = Path(__file__).resolve().parents[2]


def test_truncated_student_is_the_teachers_first_layers(tiny_teacher, tmp_path):
    """Its logits are the teacher's head applied to the teacher's hidden state after layer N / loops."""
    keep = quality_uptrain.truncated_student(tiny_teacher, tmp_path / "cut", loops=2)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    cut = AutoModelForCausalLM.from_pretrained(tmp_path / "cut", dtype=torch.float32).eval()
    assert keep == teacher.config.num_hidden_layers // 2 == cut.config.num_hidden_layers == len(cut.model.layers)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    with torch.no_grad():
        hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states[keep]  # after layer `keep`, before the norm
        expected = teacher.lm_head(teacher.model.norm(hidden))
        torch.testing.assert_close(cut(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "cut" / "tokenizer.json").is_file()
    # the study trains it as a 1-loop recursive model of the same layers (what jobs/uptrain.py takes): the same logits
    arm = next(a for a in quality_uptrain.uptrain_arms() if a.student.get("truncate"))
    student = quality_uptrain.student_dir(arm, tiny_teacher, tmp_path / "study")
    recursive = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    assert recursive.config.model_type == "rrt_recursive"
    with torch.no_grad():
        torch.testing.assert_close(recursive(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_exit_mix_spans_loop_one_to_full_depth(tiny_student, tiny_teacher):
    from rrt_ray import data, quality
    from transformers import AutoTokenizer

    tokens = data.tokenize_texts(data.load_texts("default", "heldout", 30_000), AutoTokenizer.from_pretrained(tiny_teacher))
    tokens = tokens[: 2 * quality.SEQ_LEN + 1]
    rows = quality_uptrain.exit_mix(tiny_student, tokens)
    never, always, *by_threshold = rows
    assert never["threshold"] is None and never["exit1_share"] == 0
    assert never["ppl"] == pytest.approx(quality.window_perplexity(tiny_student, tokens), rel=1e-4)  # full depth
    assert always["exit1_share"] == 1 and always["ppl"] != pytest.approx(never["ppl"], rel=1e-3)
    shares = [r["exit1_share"] for r in by_threshold]  # thresholds fall: more tokens leave
    assert [r["threshold"] for r in by_threshold] == sorted(quality_uptrain.THRESHOLDS, reverse=True)
    assert shares == sorted(shares)


@pytest.mark.parametrize("argv, message", [
    (["--groups", "uptrain,bogus"], "--groups 'uptrain,bogus': allowed: conversion, uptrain, early-exit"),
    (["--reproduce", "no-such-arm"], "unknown arm 'no-such-arm'; allowed: original, avg-r64"),
])  # fmt: skip
def test_bench_quality_bad_arguments_exit_2(argv, message):
    done = subprocess.run([sys.executable, "jobs/bench_quality.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_tune_section_reads_the_sweeps_csv(tmp_path):
    """5e: the study's report shows the sweep's trials from its results.csv (as tune/results.py writes it) and
    picks the best finished trial, never a stopped one with a lower loss; no csv: no section."""
    from rrt_ray import quality
    from rrt_ray.tune import results

    def row(name, rank, calibrate, ppl, status):
        return {"trial": name, "lora_rank": rank, "model.calibrate": calibrate, "params": 100, "params_pct": 75.06, "heldout_loss": 0.0,
                "heldout_ppl": ppl, "tokens_seen": 12288, "tokens_budget": 12288, "wall_s": 301.5, "status": status, "pareto": "", "note": "", "export_uri": ""}

    path = tmp_path / quality.TUNE_CSV
    assert quality.tune_section(path) == []
    path.write_text(results.to_csv([row("t00-64-0", 64, 0, 1234.5678, results.FINISHED), row("t01-64-16", 64, 16, 45.678, results.FINISHED),
                                    row("t02-128-0", 128, 0, 12.0, results.STOPPED)]))
    text = "\n".join(quality.tune_section(path))
    assert "| t00-64-0 | 64 | 0 | 75.06 | 1235 | 12,288 | 301.5 | finished |" in text
    assert "Best finished trial: t01-64-16 (rank 64, calibrate 16), held-out ppl 45.68." in text
