"""Devices from the cluster, not from the driver: one place for every Ray stage (train, tune, serve).

On a cluster the driver often has no GPU (KubeRay heads run at 0 CPUs, GPUs sit on workers), so nothing
here asks `torch.cuda` on the driver:

- `resolve_use_gpu(setting)`: "auto" means "the cluster has GPUs" (`ray.cluster_resources()`); "true" and
  "false" force it. Used by the Ray Train worker group, and meant for Tune trials and Serve replicas.
- `worker_resources(cpus, gpus, use_gpu)`: the resource bundle of one worker / trial / replica.
- `replica_num_gpus(setting, gpus)`: `num_gpus` for a Serve replica's `ray_actor_options`.
- Inside a process Ray started: `configure_accelerator()` picks DeepSpeed's accelerator from what that
  process sees (a CUDA device Ray gave it, or none) before DeepSpeed is imported; the torch.distributed
  backend follows the worker's bundle (Ray Train picks nccl when each worker holds a GPU, else gloo).
"""

from __future__ import annotations

import os

USE_GPU_CHOICES = ("auto", "true", "false")


def check_use_gpu(setting: str, key: str = "run.use_gpu") -> None:
    if setting not in USE_GPU_CHOICES:
        raise ValueError(f"{key} {setting!r} is not one of {', '.join(USE_GPU_CHOICES)}")


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster has in total (0 when none); Ray must be initialised."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def resolve_use_gpu(setting: str) -> bool:
    """Whether the Ray stage should request GPUs: "auto" follows the cluster's resources."""
    check_use_gpu(setting)
    if setting == "auto":
        return cluster_gpus() > 0
    return setting == "true"


def worker_resources(cpus: float, gpus: float, use_gpu: bool) -> dict[str, float]:
    """The resource bundle of one worker: CPUs always, GPUs only when use_gpu."""
    return {"CPU": cpus, "GPU": gpus} if use_gpu else {"CPU": cpus}


def replica_num_gpus(setting: str, gpus: float = 1.0) -> float:
    """`num_gpus` for a Serve replica (or any Ray actor) under the same use_gpu rule."""
    return gpus if resolve_use_gpu(setting) else 0.0


def configure_accelerator() -> str:
    """Set DS_ACCELERATOR from what this process sees ("cuda" when a GPU is visible, else "cpu") and
    return it. Call inside a Ray worker before importing deepspeed (it reads the variable on import)."""
    import torch

    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ["DS_ACCELERATOR"] = accelerator
    return accelerator
