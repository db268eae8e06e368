"""The search space (no Ray): bad spaces fail before anything starts, expansion is seeded and ordered,
and the table's Pareto marks and best-trial selection."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rrt_ray.tune import results
from rrt_ray.tune.config import TuneConfig
from rrt_ray.tune.space import TrialPlan
from rrt_ray.tune.sweep import plan_sweep

REPO = Path(__file__).resolve().parents[2]


def _job():
    spec = importlib.util.spec_from_file_location("tune_job", REPO / "jobs" / "tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"model.init": ["stepwise", "middle_out"]}, ["'middle_out'", "stepwise", "average", "lower"]),
        ({"model.lora_rank": [8, 65]}, ["65", "at most 64"]),
        ({"model.loops": [2, 3]}, ["loops=3", "allowed loops: [1, 2, 4]"]),
        ({"model.init": []}, ["space.model.init", "empty list"]),
        ({"optim.lr": {"loguniform": [0.0, 1.0e-3]}}, ["loguniform", "low > 0"]),
    ],
    ids=["unknown-init", "rank-too-large", "loops-not-dividing", "empty-list", "bad-distribution"],
)
def test_bad_space_exits_2_with_one_line_before_any_trial(sweep_config, capsys, space, expected):
    path, config = sweep_config(space)
    assert _job().main(["--config", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tune: error: "), err
    for fragment in expected:
        assert fragment in err, err
    assert not Path(config["sweep"]["storage"]).exists()  # no trial, no Tune state, no cluster


def test_bad_space_from_the_command_line_is_exit_code_2(sweep_config):
    path, _ = sweep_config({"model.init": ["stepwise"]})
    proc = subprocess.run([sys.executable, "jobs/tune.py", "--config", path, "space.model.lora_rank=[0, full, 1000]"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("tune: error: space point (model.init=stepwise, model.lora_rank=1000)")


def test_grid_and_seeded_samples(sweep_config):
    space = {"model": {"init": ["stepwise", "average"]}, "model.lora_rank": [0, 8, "full"], "optim.lr": {"loguniform": [1e-4, 1e-2]}}
    path, _ = sweep_config(space, sweep={"num_samples": 2, "seed": 7})
    plans, _ = plan_sweep(TuneConfig.load(path))
    again, _ = plan_sweep(TuneConfig.load(path))
    other, _ = plan_sweep(TuneConfig.load(path, ["sweep.seed=8"]))
    assert len(plans) == 2 * 3 * 2
    assert [p.options for p in plans] == [p.options for p in again]  # seeded
    assert [p.options["optim.lr"] for p in plans] != [p.options["optim.lr"] for p in other]
    lrs = [p.options["optim.lr"] for p in plans]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == len(lrs)
    assert [(p.options["model.init"], p.options["model.lora_rank"]) for p in plans[:4]] == [("stepwise", 0)] * 2 + [("stepwise", 8)] * 2
    for plan in plans:  # the trial's real TrainConfig carries its options and the budget
        assert plan.train["model"]["init"] == plan.options["model.init"]
        assert plan.train["optim"]["lr"] == plan.options["optim.lr"]
        assert plan.train["optim"]["max_steps"] == 2048 // (32 * 4 * 2) and plan.train["run"]["eval_every"] == 4
    sizes = {p.options["model.lora_rank"]: p.params for p in plans}
    assert sizes[0] < sizes[8] < sizes["full"]  # counted by the converter's own plan
    assert plans[0].teacher_params > sizes[0]


def test_samples_are_log_uniform():
    from rrt_ray.tune.config import Distribution

    import numpy as np

    rng = np.random.default_rng(0)
    draws = np.log10([Distribution("loguniform", 1e-4, 1e-2).sample(rng) for _ in range(4000)])
    assert abs(np.mean(draws < -3) - 0.5) < 0.03  # half the mass below the geometric midpoint


def _plan(name: str, params: int) -> TrialPlan:
    train = {"model": {"init": "average", "loops": 2, "sharing": "cycle", "lora_rank": 8, "lora_init": "svd"},
             "kd": {"weight": 0.5}, "optim": {"lr": 1e-3}}
    return TrialPlan(0, name, {"model.init": "average"}, train, params=params, teacher_params=1000)


def test_rows_status_pareto_and_selection():
    finished = {"heldout_loss": 5.0, "tokens_seen": 100, "loss": 5.0, "export_uri": "/x", "time_total_s": 3.0}
    rows = [
        results.trial_row(_plan("small", 400), finished, None, 100, 9.0),
        results.trial_row(_plan("big-better", 800), {**finished, "heldout_loss": 4.0}, None, 100, 9.0),
        results.trial_row(_plan("big-worse", 900), {**finished, "heldout_loss": 4.5}, None, 100, 9.0),
        results.trial_row(_plan("small-worse", 400), {**finished, "heldout_loss": 5.5}, None, 100, 9.0),  # a tie in size
        results.trial_row(_plan("diverged", 400), {"heldout_loss": 30.0, "loss": 50.0, "tokens_seen": 50}, None, 100, 9.0),
        results.trial_row(_plan("cut", 400), {"heldout_loss": 6.0, "loss": 6.0, "tokens_seen": 50}, None, 100, 9.0),
        results.trial_row(_plan("broken", 400), {}, "RuntimeError: boom", 100, 9.0),
    ]
    results.mark_pareto(rows)
    by = {r["trial"]: r for r in rows}
    assert [by[n]["status"] for n in by] == ["finished"] * 4 + ["stopped early"] * 2 + ["failed"]
    assert by["diverged"]["note"].startswith("diverged") and by["cut"]["note"].startswith("ASHA")
    assert [n for n in by if by[n]["pareto"]] == ["small", "big-better"]
    assert results.select_best(rows, 1.0)["trial"] == "big-better"
    assert results.select_best(rows, 0.5)["trial"] == "small"  # under a parameter budget
    assert results.select_best(rows, 0.1) is None
    assert math.isclose(by["small"]["heldout_ppl"], math.exp(5.0))
    table = results.to_markdown(rows)
    assert table.count("\n") == 2 + len(rows) and "| trial | init | loops |" in table
