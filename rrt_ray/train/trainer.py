"""Driver side of a training run: the Ray Train TorchTrainer around `loop.train_loop_per_worker`.

This module and `loop.py` are the only places that call Ray Train. What crosses the Ray boundary is a
plain dict (`TrainConfig.to_dict()`); workers get their environment (DeepSpeed on CPU, the cached
JIT-extension folder, one OpenMP thread per CPU, the S3 endpoint when set) through
`RunConfig.worker_runtime_env`, never from module globals.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Sequence

from rrt_ray import paths
from rrt_ray.train.config import TrainConfig

# Forwarded to workers when set on the driver (a cluster started elsewhere may lack them). Only settings:
# credentials are never put in a runtime env (Ray shows runtime envs in its dashboard and state API); the
# workers take them from their own environment, as the driver does.
FORWARDED_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HF_HUB_OFFLINE")
DEFAULT_EXTENSIONS_DIR = paths.cache_dir("torch_extensions")  # DeepSpeed's JIT-compiled ops (shm_comm ~35 s to build)


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """Settings for the workers' environment. DS_ACCELERATOR is not among them: each worker picks it from
    the devices it sees (`rrt_ray.devices.configure_accelerator`), not from the driver's."""
    env = {
        "OMP_NUM_THREADS": str(max(1, int(cfg.run.cpus_per_worker))),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser(DEFAULT_EXTENSIONS_DIR)),
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.update({key: os.environ[key] for key in FORWARDED_ENV if key in os.environ})
    return env


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM; its last committed checkpoint stays the run's "latest".
    A KeyboardInterrupt, so that callers' Ctrl-C handling applies and `except Exception` does not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def _interruptible(trainer_cls: type) -> type:
    """trainer_cls whose driver treats SIGTERM as Ray Train treats Ctrl-C, and remembers either.

    Ray Train's own SIGINT handler (installed by fit() once the controller exists) aborts the controller and
    its workers, and fit() then fails with a RayActorError like any crash; SIGTERM (what `ray job stop` and
    Kubernetes send) would kill the driver and leave the workers to die with it. Both now go to Ray's handler
    and are recorded, so `fit` can raise `Interrupted` instead of a failure. (`_register_sigint_handler` is
    Ray's hook; if a Ray upgrade drops it, the interrupt test fails.)
    """

    class InterruptibleTrainer(trainer_cls):
        interrupted: int | None = None

        def _register_sigint_handler(self, controller: Any) -> None:
            super()._register_sigint_handler(controller)
            ray_handler = signal.getsignal(signal.SIGINT)

            def handler(signum: int, frame: Any) -> None:
                self.interrupted = self.interrupted or signum
                if callable(ray_handler):
                    ray_handler(signal.SIGINT, frame)

            signal.signal(signal.SIGINT, handler)
            signal.signal(signal.SIGTERM, handler)

    return InterruptibleTrainer


def ensure_ray() -> None:
    """Join the cluster a `ray job submit` runs in (RAY_ADDRESS), or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True, runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})


def ray_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: local paths absolute, s3:// via pyarrow."""
    from rrt_ray import storage

    if storage.is_remote(uri):
        filesystem, path = storage.pyarrow_filesystem(uri)
        return path, filesystem
    return str(Path(uri).expanduser().resolve()), None


def scaling_config(cfg: TrainConfig) -> Any:
    """The worker group: run.num_workers workers of run.cpus_per_worker CPUs and, when run.use_gpu
    resolves to true on this cluster (auto: it has GPUs), run.gpus_per_worker GPUs each."""
    from ray.train import ScalingConfig

    from rrt_ray.devices import resolve_use_gpu, worker_resources

    use_gpu = resolve_use_gpu(cfg.run.use_gpu)
    return ScalingConfig(
        num_workers=cfg.run.num_workers,
        use_gpu=use_gpu,
        resources_per_worker=worker_resources(cfg.run.cpus_per_worker, cfg.run.gpus_per_worker, use_gpu),
    )


def fit(cfg: TrainConfig, train_loop: Callable[[dict], Any] | None = None, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the worker loop on `cfg.run.num_workers` Ray Train workers; return rank 0's final metrics.

    callbacks: Ray Train `UserCallback`s (a Tune trial passes `TuneReportCallback` here).

    A run with the same `run.name` and `run.storage` as an earlier one resumes from its last checkpoint.
    Raises RuntimeError with the workers' error on failure (after `run.max_failures` restarts), and
    `Interrupted` when SIGINT or SIGTERM stopped the run (from the main thread only, where signals arrive).
    """
    import threading

    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rrt_ray.train.loop import train_loop_per_worker

    ensure_ray()
    storage_path, filesystem = ray_storage(cfg.run.storage)
    trainer = _interruptible(TorchTrainer)(
        train_loop or train_loop_per_worker,
        train_loop_config={"train": _absolute_paths(cfg)},
        torch_config=TorchConfig(),  # backend None: Ray picks nccl when each worker holds a GPU, else gloo
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(cfg)},
            callbacks=list(callbacks),
        ),
    )
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        result = trainer.fit()
    except (Exception, SystemExit) as err:  # TrainingFailedError wraps the worker's exception; Ray's handler may sys.exit(0)
        if trainer.interrupted:
            raise Interrupted(trainer.interrupted) from err
        if isinstance(err, SystemExit):
            raise
        raise RuntimeError(f"training run {cfg.run.name!r} failed: {_root_cause(err)}") from err
    finally:
        if main_thread and None not in previous:  # Ray's handler must not outlive the run it aborts
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])
    if result.error is not None:
        raise RuntimeError(f"training run {cfg.run.name!r} failed: {_root_cause(result.error)}")
    return dict(result.return_value or result.metrics or {})


def _absolute_paths(cfg: TrainConfig) -> dict[str, Any]:
    """cfg as a dict with local storage/output made absolute here: workers do not share the driver's cwd."""
    from rrt_ray import storage

    data = cfg.to_dict()
    for key in ("storage", "output"):
        if not storage.is_remote(data["run"][key]):
            data["run"][key] = str(Path(data["run"][key]).expanduser().resolve())
    return data


def _root_cause(err: BaseException) -> str:
    """The innermost exception's one-line message (Ray wraps worker errors several times)."""
    seen = set()
    while True:
        inner = getattr(err, "cause", None) or err.__cause__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        err = inner
    text = str(err).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), type(err).__name__)
    return f"{type(err).__name__}: {last.strip()}"
