"""Uptraining and distillation on Ray Train with DeepSpeed ZeRO.

- `config`: `TrainConfig`, the typed config tree (YAML + dotted overrides, validated).
- `prepare`: driver-side checks (paths, S3 access, converted student) and teacher conversion.
- `trainer`: `fit(cfg)`, the Ray Train TorchTrainer around the worker loop (Ray calls live here and
  in `loop`).
- `loop`: the worker loop: DeepSpeed engine, CE + KD losses, metrics, checkpoints and exact resume,
  consolidated Hugging Face export.
- `losses`, `schedule`: cross-entropy and KD divergences; warmup + cosine / WSD multipliers.
- `pretrain`: the demo teacher (small Llama + BPE tokenizer), cached by content.

Importing this package does not import Ray or DeepSpeed (workers and `fit` import them when run).
"""

from rrt_ray.train.config import TrainConfig
from rrt_ray.train.pretrain import ArchConfig, PretrainConfig, pretrain_teacher
from rrt_ray.train.trainer import fit

__all__ = ["ArchConfig", "PretrainConfig", "TrainConfig", "fit", "pretrain_teacher"]
