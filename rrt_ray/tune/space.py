"""The search space, expanded into one checked plan per trial.

Every grid combination (in the order the keys are written, the last key varying fastest) is drawn
`sweep.num_samples` times for the distribution dimensions, from one `numpy` generator seeded with
`sweep.seed`: the same config always gives the same trials, in the same order.

Checks happen in two passes, both before any cluster or data path is touched:
1. `check_space(cfg)`: each value of each dimension, alone on top of `train`, must make a valid
   `TrainConfig` and converter `ConvertSpec` (so the allowed names come from the trainer's and the
   converter's own checks, e.g. "model.init 'x' is not one of ...").
2. `expand(cfg)`: every combination is planned against the teacher's config.json with
   `plan_conversion` (loops vs the layer count, ranks vs each projection's shape), which also gives
   each trial's parameter count. Only config files are read; no weights.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from rrt_ray.train.config import TrainConfig
from rrt_ray.tune.config import Distribution, TuneConfig


@dataclass
class TrialPlan:
    """One trial: its swept options, the full TrainConfig dict it runs, its size."""

    index: int
    name: str
    options: dict[str, Any]  # dotted TrainConfig key -> value
    train: dict[str, Any]  # TrainConfig.to_dict() of the trial
    params: int = 0  # parameters of the converted student
    teacher_params: int = 0

    @property
    def params_frac(self) -> float:
        return self.params / self.teacher_params if self.teacher_params else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialPlan":
        return cls(**data)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"space key {dotted!r}: {part!r} is not a TrainConfig section")
    node[leaf] = value


def _convert_spec(cfg: TrainConfig) -> Any:
    """The converter's spec for the trial's model options (every ConvertSpec field ModelConfig has)."""
    from rrt_ray.convert import ConvertSpec

    names = {f.name for f in dataclasses.fields(ConvertSpec)} & {f.name for f in dataclasses.fields(cfg.model)}
    return ConvertSpec(**{name: getattr(cfg.model, name) for name in sorted(names)})


def _budgeted(cfg: TuneConfig, train: dict[str, Any]) -> TrainConfig:
    """The trial's TrainConfig: its options applied, steps from the token budget, one report per milestone."""
    provisional = TrainConfig.from_dict(train)
    steps = max(1, round(cfg.budget.tokens / provisional.tokens_per_step))
    every = max(1, steps // cfg.budget.milestones)
    # Reports carry the held-out loss only at evaluations, and Tune needs it in every report:
    # log, evaluate and checkpoint on the same cadence (a resumed trial restarts at its last milestone).
    _set(train, "optim.max_steps", steps)
    for key in ("run.eval_every", "run.log_every", "run.checkpoint_every"):
        _set(train, key, every)
    _set(train, "run.keep_checkpoints", 1)
    return TrainConfig.from_dict(train)


def _check_base(cfg: TuneConfig) -> None:
    train = cfg.train.get("model", {}) if isinstance(cfg.train.get("model"), dict) else {}
    if train.get("student"):
        raise ValueError("train.model.student must be empty: a sweep converts train.model.teacher with each trial's options")
    if not train.get("teacher"):
        raise ValueError("train.model.teacher must name the model to convert (a directory, published root or s3:// URI)")
    data = cfg.train.get("data", {}) if isinstance(cfg.train.get("data"), dict) else {}
    if data.get("eval_batches", 1) == 0:
        raise ValueError("train.data.eval_batches must be >= 1: ASHA and the results table need the held-out loss")


def check_space(cfg: TuneConfig) -> None:
    """Pass 1: every value of every dimension, alone, must make a valid TrainConfig and ConvertSpec."""
    _check_base(cfg)
    for key, dimension in cfg.space.items():
        values = [dimension.low, dimension.high] if isinstance(dimension, Distribution) else dimension
        for value in values:
            train = copy.deepcopy(cfg.train)
            _set(train, key, value)
            try:
                _convert_spec(_budgeted(cfg, train))
            except ValueError as err:
                raise ValueError(f"space.{key}: {err}") from None
    has_distribution = any(isinstance(d, Distribution) for d in cfg.space.values())
    if cfg.sweep.num_samples > 1 and not has_distribution:
        raise ValueError(f"sweep.num_samples={cfg.sweep.num_samples} repeats identical trials: add a distribution to space or set it to 1")


def _points(cfg: TuneConfig) -> list[dict[str, Any]]:
    grid_keys = [k for k, d in cfg.space.items() if not isinstance(d, Distribution)]
    rng = np.random.default_rng(cfg.sweep.seed)
    points = []
    for combo in itertools.product(*(cfg.space[k] for k in grid_keys)):
        for _ in range(cfg.sweep.num_samples):
            point = dict(zip(grid_keys, combo))
            for key, dimension in cfg.space.items():
                if isinstance(dimension, Distribution):
                    point[key] = dimension.sample(rng)
            points.append({key: point[key] for key in cfg.space})  # the space's key order
    return points


def _short(value: Any) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def trial_name(index: int, options: dict[str, Any]) -> str:
    """t03-average-2-8-0.001: readable in TensorBoard and the table, unique by the index."""
    return "-".join([f"t{index:02d}", *(_short(v) for v in options.values())]).replace("/", "_")


def teacher_config(teacher: str) -> Any:
    """The teacher's text config from its config.json (a published root resolves its "latest")."""
    from transformers import AutoConfig

    from rrt_ray.train.prepare import resolve_model
    from rrt_ray import storage

    uri = resolve_model(teacher, "train.model.teacher")
    if storage.is_remote(uri):
        data = json.loads(storage.read_text(storage.join(uri, "config.json")))
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(uri)
    except OSError as err:  # a hub id (resolve_model passes those through when online) that cannot be fetched
        from rrt_ray.convert.source import hub_reason

        raise ValueError(f"train.model.teacher {teacher!r} is not a local model and could not be fetched from the hub: {hub_reason(err)}") from None


def expand(cfg: TuneConfig, text_config: Any) -> list[TrialPlan]:
    """Pass 2: every trial planned against the teacher's config (raises ValueError naming the bad point)."""
    from rrt_ray.convert import plan_conversion

    plans, sizes = [], {}
    for index, options in enumerate(_points(cfg)):
        train = copy.deepcopy(cfg.train)
        for key, value in options.items():
            _set(train, key, value)
        try:
            trial_cfg = _budgeted(cfg, train)
            spec = _convert_spec(trial_cfg)
            key = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
            if key not in sizes:  # the same conversion options plan once
                plan = plan_conversion(text_config, spec)
                sizes[key] = (plan.params["total"], plan.original_params)
        except ValueError as err:
            shown = ", ".join(f"{k}={_short(v)}" for k, v in options.items())
            raise ValueError(f"space point ({shown}): {err}") from None
        name = trial_name(index, options)
        trial_cfg.run.name = name
        plans.append(TrialPlan(index, name, options, trial_cfg.to_dict(), *sizes[key]))
    return plans
