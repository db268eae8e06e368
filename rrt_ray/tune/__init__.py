"""Ray Tune sweeps over conversion and training options (init, loops, sharing, LoRA rank and init,
distillation weight, learning rate, or any other `TrainConfig` key).

- `config`: `TuneConfig`, the typed sweep config (YAML + dotted overrides, validated).
- `space`: grid + seeded random expansion into `TrialPlan`s, each checked by building its real
  `TrainConfig` and the converter's plan against the teacher's config (no weights read).
- `runner`: the Ray side: the trial function (convert with the content cache, then a Ray Train V2
  `TorchTrainer` reporting through `TuneReportCallback`), ASHA on held-out loss at token milestones, a
  divergence stopper, resume with `Tuner.restore`, per-trial TensorBoard curves and one log line per report.
- `results`: the results table (CSV + Markdown, Pareto marks), the plot, and the best model's export.

Importing this package does not import Ray.
"""

from rrt_ray.tune.config import TuneConfig
from rrt_ray.tune.space import TrialPlan, check_space, expand

__all__ = ["TrialPlan", "TuneConfig", "check_space", "expand"]
