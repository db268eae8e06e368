"""The training configuration: one typed dataclass tree, the single source of truth.

YAML files under `jobs/configs/` and dotted command-line overrides (`optim.lr=3e-4`, `zero.stage=3`)
both go through `TrainConfig.from_dict`, which rejects unknown keys with the list of valid ones and
coerces strings to the annotated field types. Every section validates itself in `__post_init__`,
raising `ValueError` that names the bad value and what is allowed. Across the Ray boundary the config
travels as `to_dict()` and is rebuilt with `TrainConfig.from_dict` inside each worker.

Sections:
    model  what to train (a converted model dir, or the teacher to convert) and the KD teacher
    data   corpus, sequence length, micro-batch size, held-out evaluation
    optim  AdamW, schedule (warmup + cosine or WSD), clipping, accumulation, steps
    kd     distillation loss from the frozen teacher's logits
    zero   DeepSpeed ZeRO stage and precision
    run    Ray: name, checkpoint storage, export destination, workers, failures, cadences
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rrt_ray.overrides import apply_override, build
from rrt_ray import paths
from rrt_ray.devices import check_use_gpu
from rrt_ray.models.layer_map import SHARING_MODES
from rrt_ray.overrides import valid_keys as _valid_keys

SCHEDULES = ("cosine", "wsd", "constant")
ZERO_STAGES = (1, 2, 3)
PRECISIONS = ("fp32", "bf16")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    """What to train.

    student: a converted (rrt_recursive) model directory or s3:// URI to uptrain; empty: convert
        `teacher` with the options below into `<run.workdir>/converted`.
    teacher: the original Hugging Face model: the KD teacher and the conversion source. A directory
        without config.json but with a "latest" marker (a published root) resolves to its latest entry.
    loops, sharing, init, lora_rank, lora_init: conversion options (`rrt convert`); lora_rank is 0 (plain
        recursive), a rank, or "full" (exact reproduction of the teacher at step 0).
    calibrate: calibration sequences of the conversion (`rrt convert --calibrate N`: activation-aware SVD and
        shared init fitted on the training split with the converter's default options); 0: the paper's plain SVD.
        On a real model this is the difference between starting at perplexity ~10^6 and ~10^2.
    gradient_checkpointing: recompute activations in the backward pass (memory for time).
    loss_chunk_tokens: run the LM head and the loss on this many tokens at a time (train/head_loss.py), so that
        no whole-batch logits tensor exists: the same loss and gradients, a fraction of the memory with a large
        vocabulary. 0: the whole micro-batch at once. Not under ZeRO-3 (its head weight is partitioned).
    """

    student: str = ""
    teacher: str = ""
    loops: int = 2
    sharing: str = "cycle"
    init: str = "average"
    lora_rank: int | str = 0
    lora_init: str = "svd"
    calibrate: int = 0
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = 256

    def __post_init__(self) -> None:
        from rrt_ray.convert.init_strategies import INIT_STRATEGIES  # the registries: choices are listed once
        from rrt_ray.convert.lora_init import LORA_INITS
        from rrt_ray.models.layer_map import SHARING_MODES

        _require(self.loops >= 1, f"model.loops must be >= 1, got {self.loops}")
        _require(self.loss_chunk_tokens >= 0, f"model.loss_chunk_tokens must be >= 0 (tokens per LM-head chunk; 0: the whole micro-batch), got {self.loss_chunk_tokens}")
        _require(self.calibrate >= 0, f"model.calibrate must be >= 0 (calibration sequences; 0: plain SVD), got {self.calibrate}")
        _require(self.sharing in SHARING_MODES, f"model.sharing {self.sharing!r} is not one of {SHARING_MODES.allowed()}")
        _require(self.init in INIT_STRATEGIES, f"model.init {self.init!r} is not one of {INIT_STRATEGIES.allowed()}")
        _require(self.lora_init in LORA_INITS, f"model.lora_init {self.lora_init!r} is not one of {LORA_INITS.allowed()}")
        _require(
            self.lora_rank == "full" or (isinstance(self.lora_rank, int) and self.lora_rank >= 0),
            f"model.lora_rank must be an integer >= 0 or 'full', got {self.lora_rank!r}",
        )


@dataclass
class DataConfig:
    """The corpus and how it is cut.

    source: "default" (the embedded CPython-stdlib corpus), a local file or directory, an s3:// prefix,
        or a hub dataset name. train_split / eval_split name the splits given to `load_texts`.
    max_bytes: read at most this much text per split (None: all of it).
    seq_len: tokens per packed sequence; micro_batch_size: sequences per worker per micro-step.
    eval_batches: held-out micro-batches per worker for perplexity.
    cache_dir: where tokenised corpora are cached by content (per node; see `rrt_ray.paths`).
    """

    source: str = "default"
    train_split: str = "train"
    eval_split: str = "heldout"
    max_bytes: int | None = None
    seq_len: int = 256
    micro_batch_size: int = 8
    eval_batches: int = 4
    cache_dir: str = paths.cache_dir("tokens")

    def __post_init__(self) -> None:
        _require(bool(self.source), "data.source must not be empty (use 'default' for the embedded corpus)")
        _require(self.max_bytes is None or self.max_bytes > 0, f"data.max_bytes must be > 0 or null, got {self.max_bytes}")
        _require(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        _require(self.micro_batch_size >= 1, f"data.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _require(self.eval_batches >= 0, f"data.eval_batches must be >= 0, got {self.eval_batches}")


@dataclass
class OptimConfig:
    """AdamW (client torch.optim.AdamW: no JIT-compiled op) and its schedule.

    max_steps counts optimizer steps; each is grad_accum micro-batches on every worker.
    schedule: "cosine" (linear warmup, cosine to min_lr_ratio * lr), "wsd" (warmup, stable, then linear
        decay over the last decay_fraction of the steps), or "constant" (warmup then flat).
    grad_clip: global gradient-norm clipping (0 disables).
    """

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 10
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    grad_accum: int = 1
    max_steps: int = 100

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        _require(self.schedule in SCHEDULES, f"optim.schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0 < self.decay_fraction <= 1, f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _require(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        _require(self.max_steps >= 1, f"optim.max_steps must be >= 1, got {self.max_steps}")


@dataclass
class KDConfig:
    """Knowledge distillation from the frozen teacher's logits.

    loss = (1 - weight) * CE(student, next token) + weight * temperature**2 * D(teacher || student)
    with D one of forward_kl KL(p_t || p_s), reverse_kl KL(p_s || p_t), jsd (Jensen-Shannon).
    weight 0 turns distillation off (the teacher is then not loaded).
    """

    weight: float = 0.5
    loss: str = "forward_kl"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        from rrt_ray.train.losses import KD_LOSSES

        _require(0 <= self.weight <= 1, f"kd.weight must be in [0, 1], got {self.weight}")
        _require(self.loss in KD_LOSSES, f"kd.loss {self.loss!r} is not one of {KD_LOSSES.allowed()}")
        _require(self.temperature > 0, f"kd.temperature must be > 0, got {self.temperature}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0


@dataclass
class EarlyExitConfig:
    """Early exit after every loop (CYCLE-shared recursive students only).

    loss = (1 - kd.weight) * EE + kd.weight * KD(final exit), with
    EE = sum_b w_b CE(exit_b) / sum_b w_b + distill_weight * mean_b KL(final exit (detached) || exit_b).
    schedule: the exit weights w ("aggressive": 0.1 on intermediate exits, 1.0 on the last, as in the paper).
    freeze_backbone: post-training mode: shared weights, embeddings and head frozen; LoRA and per-depth
    norms and biases train.
    """

    enabled: bool = False
    schedule: str = "aggressive"
    distill_weight: float = 1.0
    freeze_backbone: bool = False

    def __post_init__(self) -> None:
        from rrt_ray.models.early_exit import EXIT_SCHEDULES

        _require(self.schedule in EXIT_SCHEDULES, f"early_exit.schedule {self.schedule!r} is not one of {', '.join(EXIT_SCHEDULES)}")
        _require(self.distill_weight >= 0, f"early_exit.distill_weight must be >= 0, got {self.distill_weight}")
        _require(self.enabled or not self.freeze_backbone, "early_exit.freeze_backbone needs early_exit.enabled=true")


@dataclass
class ZeroConfig:
    """DeepSpeed: ZeRO stage 1, 2 or 3 and the compute precision (fp32 or bf16; fp16 fails on CPU).

    bucket_size: ZeRO-1/2 reduce and all-gather bucket, in elements.
    """

    stage: int = 2
    precision: str = "fp32"
    bucket_size: int = 50_000_000

    def __post_init__(self) -> None:
        _require(self.stage in ZERO_STAGES, f"zero.stage {self.stage} is not one of 1, 2, 3")
        _require(self.precision in PRECISIONS, f"zero.precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        _require(self.bucket_size > 0, f"zero.bucket_size must be > 0, got {self.bucket_size}")


@dataclass
class RunOptions:
    """The Ray side: where things go and how often.

    name: the Ray Train run name; a rerun with the same name and storage resumes from its last checkpoint.
    storage: root for Ray Train checkpoints: a local directory or s3://bucket/prefix.
    output: root the exported Hugging Face directory is published under (local or s3://), as
        `<output>/<name>` with a "latest" marker written after the upload is complete.
    workdir: local scratch (converted model, staging), a cache (see `rrt_ray.paths`); storage and output
        are outputs: relative paths there are relative to the current directory.
    num_workers, cpus_per_worker: the Ray Train worker group.
    use_gpu: "auto" (GPUs when the cluster has them, from `ray.cluster_resources()`, not the driver's
        devices), true or false; gpus_per_worker: GPUs per worker when it is on (`rrt_ray.devices`).
    max_failures: whole-group restarts from the last checkpoint after a worker dies (-1: unlimited).
    checkpoint_every, log_every, eval_every: cadences in optimizer steps (0 disables checkpoints/eval).
    keep_checkpoints: how many checkpoints Ray keeps.
    verify_export: reload the export in the worker and compare its logits with the engine's.
    stop_at: stop with a checkpoint (and no export) after this optimizer step; 0 runs to optim.max_steps.
        The schedule still spans optim.max_steps, so a later run with the same name continues the curve.
    trim_heap: return the C heap's free pages to the OS after every forward, backward and optimizer step (glibc
        malloc_trim; train/memory.py): a lower peak RSS per worker for a little time (jobs/bench_train_memory.py).
    mmap_threshold_mb: serve allocations of at least this many MiB from mmap, returned to the OS when freed
        (glibc mallopt, set when the worker starts; 0: glibc's own dynamic threshold).
    """

    name: str = "uptrain"
    storage: str = "runs"
    output: str = "out/uptrained"
    workdir: str = paths.cache_dir("work")
    seed: int = 0
    num_workers: int = 2
    cpus_per_worker: int = 1
    use_gpu: str | bool = "auto"
    gpus_per_worker: float = 1.0
    max_failures: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 50
    verify_export: bool = True
    stop_at: int = 0
    trim_heap: bool = False
    mmap_threshold_mb: int = 0

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, f"run.name must be a non-empty name without '/', got {self.name!r}")
        _require(bool(self.storage), "run.storage must be a local directory or s3:// URI")
        _require(bool(self.output), "run.output must be a local directory or s3:// URI")
        _require(self.num_workers >= 1, f"run.num_workers must be >= 1, got {self.num_workers}")
        _require(self.cpus_per_worker > 0, f"run.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        self.use_gpu = str(self.use_gpu).lower()  # YAML's true/false arrive as bools
        check_use_gpu(self.use_gpu)
        _require(self.gpus_per_worker > 0, f"run.gpus_per_worker must be > 0, got {self.gpus_per_worker}")
        _require(self.max_failures >= -1, f"run.max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        for key in ("checkpoint_every", "eval_every"):
            _require(getattr(self, key) >= 0, f"run.{key} must be >= 0 (0 disables), got {getattr(self, key)}")
        _require(self.log_every >= 1, f"run.log_every must be >= 1, got {self.log_every}")
        _require(self.stop_at >= 0, f"run.stop_at must be >= 0 (0: run to optim.max_steps), got {self.stop_at}")
        _require(0 <= self.mmap_threshold_mb <= 32, f"run.mmap_threshold_mb must be in [0, 32] (MiB; 0: glibc's default), got {self.mmap_threshold_mb}")
        _require(self.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        _require(
            self.optim.warmup_steps < self.optim.max_steps,
            f"optim.warmup_steps ({self.optim.warmup_steps}) must be < optim.max_steps ({self.optim.max_steps})",
        )
        _require(bool(self.model.student or self.model.teacher), "set model.student (a converted model) or model.teacher (to convert)")
        _require(not self.kd.enabled or bool(self.model.teacher), f"kd.weight={self.kd.weight} needs model.teacher (or set kd.weight=0)")
        exits = [name for name in SHARING_MODES.names() if SHARING_MODES.get(name).loop_exits]
        _require(
            not self.early_exit.enabled or bool(self.model.student) or self.model.sharing in exits,
            f"early_exit needs a sharing mode with exits between loops ({', '.join(exits)}), got {self.model.sharing!r}",
        )

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step across all workers."""
        return self.data.seq_len * self.data.micro_batch_size * self.optim.grad_accum * self.run.num_workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return build(cls, data)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
        """A YAML file (or the defaults) plus dotted `key.sub=value` overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"config file {str(path)!r} does not exist")
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data)


def valid_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts (`optim.lr`, `zero.stage`, ...)."""
    return _valid_keys(cls, prefix)
