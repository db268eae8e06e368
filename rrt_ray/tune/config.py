"""The sweep configuration: one typed dataclass tree, validated in `__post_init__`.

    train   the base `TrainConfig` every trial starts from (its sections inline: model, data, optim, ...)
    space   the search space: dotted `TrainConfig` keys, each a list of grid values or a distribution
            ({loguniform: [low, high]}, {uniform: [low, high]}) sampled with `sweep.seed`
    budget  the token budget of one trial and the held-out milestones ASHA decides at
    asha    the early-stopping scheduler; `diverge_factor` for the divergence stopper
    select  how the best trial is chosen (optionally under a parameter budget)
    sweep   name, storage (Tune state; local or s3://), output (table, plot, best model), concurrency

The space names `TrainConfig` keys (`model.init`, `model.lora_rank`, `optim.lr`, `kd.weight`, ...), so
every option the trainer and converter accept can be swept and none of their choice lists is copied
here: `rrt_ray.tune.space.expand` builds the real `TrainConfig` and the converter's plan for every point.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rrt_ray.overrides import apply_override, build

DISTRIBUTIONS = ("loguniform", "uniform")
SELECT_METRICS = ("heldout_loss",)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class Distribution:
    """A continuous dimension sampled `sweep.num_samples` times per grid point."""

    kind: str
    low: float
    high: float

    def __post_init__(self) -> None:
        _require(self.kind in DISTRIBUTIONS, f"unknown distribution {self.kind!r}; allowed: {', '.join(DISTRIBUTIONS)}")
        _require(self.low < self.high, f"{self.kind} needs low < high, got [{self.low}, {self.high}]")
        _require(self.kind != "loguniform" or self.low > 0, f"loguniform needs low > 0, got {self.low}")

    def sample(self, rng: Any) -> float:
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))


def _flatten(section: Any, prefix: str = "") -> dict[str, Any]:
    """{'model': {'init': [...]}} and {'model.init': [...]} alike -> {'model.init': [...]}."""
    flat: dict[str, Any] = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not set(value) & set(DISTRIBUTIONS):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def parse_dimension(key: str, value: Any) -> list[Any] | Distribution:
    """A grid (a non-empty list, or one scalar) or a {loguniform|uniform: [low, high]} distribution."""
    if isinstance(value, dict):
        (kind, bounds), *rest = value.items()
        _require(not rest and isinstance(bounds, list) and len(bounds) == 2,
                 f"space.{key} must be a list of values or {{loguniform|uniform: [low, high]}}, got {value!r}")
        try:
            return Distribution(kind, float(bounds[0]), float(bounds[1]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"space.{key}: {err}") from None
    if not isinstance(value, list):
        value = [value]
    _require(len(value) > 0, f"space.{key} is an empty list; give at least one value")
    return value


@dataclass
class BudgetConfig:
    """tokens: the token budget of one trial (optimizer steps = tokens / train's tokens per step).
    milestones: held-out evaluations (and ASHA decisions) per trial, evenly spaced in tokens."""

    tokens: int = 65_536
    milestones: int = 4

    def __post_init__(self) -> None:
        _require(self.tokens > 0, f"budget.tokens must be > 0, got {self.tokens}")
        _require(self.milestones >= 1, f"budget.milestones must be >= 1, got {self.milestones}")


@dataclass
class AshaConfig:
    """ASHA on held-out loss at token milestones. grace_milestones: milestones before the first cut;
    reduction_factor: keep the best 1/factor at each rung. A trial whose training loss is not finite or
    exceeds diverge_factor * ln(vocab size) (worse than a uniform guess by that factor) stops at once."""

    enabled: bool = True
    grace_milestones: int = 1
    reduction_factor: int = 2
    diverge_factor: float = 1.5

    def __post_init__(self) -> None:
        _require(self.grace_milestones >= 1, f"asha.grace_milestones must be >= 1, got {self.grace_milestones}")
        _require(self.reduction_factor >= 2, f"asha.reduction_factor must be >= 2, got {self.reduction_factor}")
        _require(self.diverge_factor > 1, f"asha.diverge_factor must be > 1, got {self.diverge_factor}")


@dataclass
class SelectConfig:
    """The best trial: lowest held-out loss among finished trials, optionally only those with at most
    max_params_frac of the teacher's parameters (1.0: no limit)."""

    metric: str = "heldout_loss"
    max_params_frac: float = 1.0

    def __post_init__(self) -> None:
        _require(self.metric in SELECT_METRICS, f"select.metric {self.metric!r} is not one of {', '.join(SELECT_METRICS)}")
        _require(0 < self.max_params_frac <= 10, f"select.max_params_frac must be in (0, 10], got {self.max_params_frac}")


@dataclass
class SweepOptions:
    """name: the sweep (a rerun with the same name and storage resumes it). storage: Tune's state and the
    trials' Ray Train checkpoints (local or s3://). output: results table, plot, TensorBoard curves and
    the best model (local or s3://), under `<output>/<name>`. num_samples: random draws per grid point.
    max_concurrent: trials at once (0: as many as the cluster's CPUs fit). trial_memory_mb: what the
    trial driver (a 0-CPU actor: conversion and the TorchTrainer's controller) reserves."""

    name: str = "tune"
    storage: str = "runs/tune"
    output: str = "out/tune"
    num_samples: int = 1
    seed: int = 0
    max_concurrent: int = 0
    trial_memory_mb: int = 256

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, f"sweep.name must be a non-empty name without '/', got {self.name!r}")
        _require(bool(self.storage) and bool(self.output), "sweep.storage and sweep.output must be local directories or s3:// URIs")
        _require(self.num_samples >= 1, f"sweep.num_samples must be >= 1, got {self.num_samples}")
        _require(self.max_concurrent >= 0, f"sweep.max_concurrent must be >= 0 (0: fit the cluster), got {self.max_concurrent}")
        _require(self.trial_memory_mb > 0, f"sweep.trial_memory_mb must be > 0, got {self.trial_memory_mb}")


@dataclass
class TuneConfig:
    train: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    asha: AshaConfig = field(default_factory=AshaConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    sweep: SweepOptions = field(default_factory=SweepOptions)

    def __post_init__(self) -> None:
        _require(isinstance(self.train, dict), f"train must be a mapping of TrainConfig sections, got {self.train!r}")
        _require(isinstance(self.space, dict) and bool(self.space), "space must map at least one TrainConfig key (e.g. model.init) to values")
        self.space = {key: parse_dimension(key, value) for key, value in _flatten(self.space).items()}
        from rrt_ray.tune.space import check_space

        check_space(self)  # every value builds a real TrainConfig and converter spec (no path is read)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["space"] = {k: ({v.kind: [v.low, v.high]} if isinstance(v, Distribution) else v) for k, v in self.space.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TuneConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a tune config must be a mapping of sections, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown tune config section {unknown[0]!r}; valid sections: {', '.join(names)}")
        sections = {"budget": BudgetConfig, "asha": AshaConfig, "select": SelectConfig, "sweep": SweepOptions}
        kwargs = {name: build(kind, data.get(name) or {}, f"{name}.") for name, kind in sections.items()}
        return cls(train=data.get("train") or {}, space=data.get("space") or {}, **kwargs)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "TuneConfig":
        """A YAML file plus dotted overrides (`sweep.name=x`, `space.model.init=[stepwise]`, `train.optim.lr=1e-3`)."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            _require(path.is_file(), f"config file {str(path)!r} does not exist")
            data = yaml.safe_load(path.read_text()) or {}
            _require(isinstance(data, dict), f"config file {str(path)!r} must hold a mapping of sections")
        for item in overrides:
            key = item.partition("=")[0]
            if key.startswith("space.") and isinstance(data.get("space"), dict):
                # A space key is one dotted TrainConfig key: replace it whole, whichever way the YAML nests it.
                data["space"] = _flatten(data["space"])
                data["space"][key.removeprefix("space.")] = yaml.safe_load(item.partition("=")[2])
                continue
            apply_override(data, item)
        return cls.from_dict(data)
