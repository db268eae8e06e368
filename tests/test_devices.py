"""Devices come from the cluster's resources, not from the driver (no GPU needed: Ray trusts a declared
`num_gpus`). Each case starts its own local cluster in a subprocess, so the session's cluster is untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rrt_ray.devices import check_use_gpu, worker_resources

PROBE = textwrap.dedent("""
    import json
    import ray
    from rrt_ray.train.config import TrainConfig
    from rrt_ray.train.trainer import scaling_config

    results = []
    for num_gpus, overrides in ((2, []), (0, []), (2, ["run.use_gpu=false"])):
        ray.init(num_cpus=2, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
        cfg = TrainConfig.load(None, ["model.student=s", "kd.weight=0", "run.num_workers=2", *overrides])
        scaling = scaling_config(cfg)
        group = ray.util.placement_group([scaling.resources_per_worker] * scaling.num_workers)
        ray.get(group.ready(), timeout=60)  # the cluster places exactly what the trainer asks for
        results.append({"use_gpu": scaling.use_gpu, "bundle": scaling.resources_per_worker,
                        "gpus_left": ray.available_resources().get("GPU", 0.0)})
        ray.shutdown()
    print("RESULT " + json.dumps(results))
""")


@pytest.mark.slow
def test_use_gpu_follows_the_cluster_resources_not_the_driver():
    """One subprocess, three local clusters: 2 fake GPUs (auto), none (auto), 2 fake GPUs with use_gpu=false."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    with_gpus, without, forced_off = json.loads(line.removeprefix("RESULT "))
    assert with_gpus == {"use_gpu": True, "bundle": {"CPU": 1, "GPU": 1.0}, "gpus_left": 0.0}
    assert without["use_gpu"] is False and without["bundle"] == {"CPU": 1}
    assert forced_off == {"use_gpu": False, "bundle": {"CPU": 1}, "gpus_left": 2.0}


def test_choices_and_bundles():
    assert worker_resources(2, 0.5, True) == {"CPU": 2, "GPU": 0.5}
    assert worker_resources(2, 0.5, False) == {"CPU": 2}
    with pytest.raises(ValueError, match="run.use_gpu 'maybe' is not one of auto, true, false"):
        check_use_gpu("maybe")
    from rrt_ray.train.config import TrainConfig

    assert TrainConfig.load(None, ["model.teacher=t", "run.use_gpu=true"]).run.use_gpu == "true"
    with pytest.raises(ValueError, match="run.use_gpu 'gpu' is not one of auto, true, false"):
        TrainConfig.load(None, ["model.teacher=t", "run.use_gpu=gpu"])
