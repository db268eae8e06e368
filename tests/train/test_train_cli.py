"""jobs/uptrain.py and jobs/pretrain.py on bad input: exit 2 with one clear line, before any Ray worker.

One case runs the real command in a subprocess; the others call the same `main` in-process (the
interpreter start and imports cost ~5 s a run).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _job_main(script: str):
    spec = importlib.util.spec_from_file_location(f"rrt_job_{script[:-3]}", REPO / "jobs" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    """main(args) in-process, its exit code and stdout/stderr shaped like a subprocess result."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _job_main(script)(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def _no_s3_credentials(monkeypatch):
    for key in [k for k in os.environ if k.startswith("AWS_")] + ["RAY_ADDRESS"]:
        monkeypatch.delenv(key, raising=False)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a run that exited with status 2."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Ray" not in result.stdout + result.stderr  # no cluster was started
    return lines[0]


@pytest.fixture(scope="module")
def configs(tmp_path_factory, tiny_teacher, tiny_student):
    return {"teacher": tiny_teacher, "student": tiny_student, "tmp": tmp_path_factory.mktemp("cli")}


def test_unknown_key_lists_valid_keys_as_a_real_command():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    result = subprocess.run([sys.executable, "jobs/uptrain.py", "--config", "jobs/configs/demo.yaml", "optim.learnig_rate=1e-3"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    line = _one_line_error(result)
    assert line.startswith("uptrain: error: unknown config key 'optim.learnig_rate'; valid keys: optim.lr,")


def test_missing_data_path(configs):
    line = _one_line_error(_run("uptrain.py", "--config", "jobs/configs/demo.yaml", f"model.teacher={configs['teacher']}",
                                f"data.source={configs['tmp']}/no/such/corpus.jsonl"))
    assert "data.source" in line and "does not exist" in line


def test_missing_s3_credentials(configs):
    line = _one_line_error(_run("uptrain.py", "--config", "jobs/configs/demo.yaml", f"model.teacher={configs['teacher']}",
                                "run.storage=s3://some-bucket/runs"))
    assert "AWS_ACCESS_KEY_ID" in line and "s3://some-bucket/runs" in line


def test_student_that_is_not_converted(configs):
    line = _one_line_error(_run("uptrain.py", "--config", "jobs/configs/demo.yaml", f"model.teacher={configs['teacher']}",
                                f"model.student={configs['teacher']}"))
    assert "is not a converted recursive model (model_type 'llama'" in line


def test_missing_teacher(configs):
    line = _one_line_error(_run("uptrain.py", "--config", "jobs/configs/demo.yaml", f"model.teacher={configs['tmp']}/nothing"))
    assert "model.teacher" in line and "does not exist" in line


def test_pretrain_rejects_odd_layer_count():
    line = _one_line_error(_run("pretrain.py", "--config", "jobs/configs/pretrain_demo.yaml", "arch.num_layers=9"))
    assert line == "pretrain: error: arch.num_layers must be even and >= 8, got 9"
