"""Learning-rate schedules as multipliers of the peak rate, for `torch.optim.lr_scheduler.LambdaLR`.

    cosine    linear warmup to 1, then cosine down to min_ratio at max_steps
    wsd       warmup, stable at 1, then linear decay to min_ratio over the last decay_fraction of steps
              (warmup-stable-decay, as in MiniCPM)
    constant  linear warmup, then 1

The scheduler is handed to `deepspeed.initialize`, which steps it once per optimizer step and saves
its state in the checkpoint, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(
    schedule: str, warmup_steps: int, max_steps: int, min_ratio: float, decay_fraction: float = 0.2
) -> Callable[[int], float]:
    """step (0-based count of optimizer steps taken) -> multiplier of the peak learning rate."""

    def warmup(step: int) -> float:
        return (step + 1) / (warmup_steps + 1)

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    decay_start = max(warmup_steps, int(round(max_steps * (1.0 - decay_fraction))))

    def wsd(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - min_ratio) * progress

    def constant(step: int) -> float:
        return warmup(step) if step < warmup_steps else 1.0

    schedules = {"cosine": cosine, "wsd": wsd, "constant": constant}
    if schedule not in schedules:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(schedules)}")
    return schedules[schedule]
