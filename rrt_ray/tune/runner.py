"""The Ray side of a sweep: the trial function, the scheduler, the stopper, resume, live logging.

This is the only module of `rrt_ray.tune` that calls Ray.

- Trial function (Ray Train V2 pattern): convert the teacher with the trial's options through
  `rrt_ray.train.prepare.convert_teacher` (cached by teacher files + options, so the same options never
  convert twice), then `rrt_ray.train.trainer.fit` with `HeldoutReportCallback`, a `TuneReportCallback`
  that adds `heldout_loss = ln(heldout_ppl)`. It holds no CPU (its work is the workers'), only a little
  memory: a bundle of zeros is refused by Ray, and memory needs no custom resource on the cluster.
- Concurrency: `sweep.max_concurrent`, or as many trials as the cluster's CPUs hold worker groups
  (1 on a 2-CPU machine with 2 one-CPU workers): the others queue instead of oversubscribing.
- ASHA on `heldout_loss` with the tokens seen as time (rungs at the token milestones); note that ASHA
  never stops the first trial to reach a rung, so with one trial at a time the order matters.
  `DivergenceStopper` ends a trial at its first report with a non-finite loss or a loss above
  `diverge_factor * ln(vocab)`.
- Resume: a rerun finds the experiment at `<sweep.storage>/<sweep.name>` and `Tuner.restore`s it:
  finished trials are kept, interrupted ones restart their trial function, whose TorchTrainer (same
  run name and storage) resumes from its last milestone checkpoint.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback, Stopper
from ray.tune.integration.ray_train import TuneReportCallback

from rrt_ray.tune.config import TuneConfig
from rrt_ray.tune.space import TrialPlan

ASHA_TIME = "asha_tokens"
TB_SCALARS = ("loss", "ce_loss", "kd_loss", "heldout_loss", "heldout_ppl", "lr", "tokens_per_s")


class HeldoutReportCallback(TuneReportCallback):
    """TuneReportCallback that adds ASHA's metric and time to rank 0's report.

    heldout_loss = ln(heldout_ppl) where the loop does not report it. asha_tokens = tokens_seen, left out at the token budget: ASHA stops
    any trial whose time reaches its max_t, and the budget's last report comes before the export, which
    must still run (ASHA lets a report without its time attribute pass).
    """

    def __init__(self, budget_tokens: int) -> None:
        super().__init__()
        self.budget_tokens = budget_tokens

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        enriched = []
        for worker_metrics in metrics:
            extra: dict[str, Any] = {}
            if "heldout_ppl" in worker_metrics and "heldout_loss" not in worker_metrics:
                ppl = worker_metrics["heldout_ppl"]
                extra["heldout_loss"] = math.log(ppl) if ppl > 0 and math.isfinite(ppl) else float("inf")
            if worker_metrics.get("tokens_seen", self.budget_tokens) < self.budget_tokens:
                extra[ASHA_TIME] = worker_metrics["tokens_seen"]
            enriched.append({**worker_metrics, **extra})
        super().after_report(run_context, enriched, checkpoint)


def run_trial(config: dict[str, Any]) -> None:
    """Tune trial function: config is {"plan": TrialPlan.to_dict()}."""
    from rrt_ray.train.config import TrainConfig
    from rrt_ray.train.prepare import convert_teacher, warm_token_cache
    from rrt_ray.train.trainer import fit

    plan = TrialPlan.from_dict(config["plan"])
    cfg = TrainConfig.from_dict(plan.train)
    cfg.model.student = convert_teacher(cfg, log=lambda line: print(f"tune: {plan.name}: {line}", flush=True))
    warm_token_cache(cfg)
    fit(cfg, callbacks=[HeldoutReportCallback(cfg.optim.max_steps * cfg.tokens_per_step)])


class DivergenceStopper(Stopper):
    """Stop a trial at once when its loss is not finite or above `limit` (nats per token)."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return diverged(result, self.limit)

    def stop_all(self) -> bool:
        return False


def diverged(result: dict[str, Any], limit: float) -> bool:
    values = [result[key] for key in ("loss", "heldout_loss") if key in result]
    return any(not math.isfinite(v) for v in values) or result.get("loss", 0.0) > limit


class ProgressCallback(Callback):
    """One line per trial report, start, finish and error; TensorBoard scalars per trial (step = tokens)."""

    def __init__(self, tensorboard_dir: str, budget_tokens: int, log: Callable[[str], None] = print) -> None:
        self.tensorboard_dir, self.budget_tokens, self.log = tensorboard_dir, budget_tokens, log
        self._writers: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks into its experiment state
        return {**self.__dict__, "_writers": {}}

    def _name(self, trial: Any) -> str:
        return trial.config["plan"]["name"]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.log(f"tune: {self._name(trial)} started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        name, tokens = self._name(trial), int(result.get("tokens_seen", 0))
        if "export_uri" in result:  # the export's report repeats the last milestone's metrics
            self.log(f"tune: {name} exported {result['export_uri']}")
            return
        line = f"tune: {name} tokens {tokens:,}/{self.budget_tokens:,} loss {result.get('loss', float('nan')):.4f}"
        if "heldout_loss" in result:
            line += f" heldout {result['heldout_loss']:.4f} (ppl {result.get('heldout_ppl', float('nan')):.2f})"
        self.log(line)
        writer = self._writer(name)
        for key in TB_SCALARS:
            value = result.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(key, value, global_step=tokens)
        writer.flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tokens = int((trial.last_result or {}).get("tokens_seen", 0))
        self.log(f"tune: {self._name(trial)} {'finished' if tokens >= self.budget_tokens else 'stopped early'} at {tokens:,} tokens")
        self._close(self._name(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.log(f"tune: {self._name(trial)} failed (see {trial.local_path or trial.path})")
        self._close(self._name(trial))

    def _writer(self, name: str) -> Any:
        if name not in self._writers:
            from tensorboardX import SummaryWriter

            self._writers[name] = SummaryWriter(str(Path(self.tensorboard_dir) / name))
        return self._writers[name]

    def _close(self, name: str) -> None:
        writer = self._writers.pop(name, None)
        if writer is not None:
            writer.close()


def join_cluster() -> None:
    """Join the cluster of a `ray job submit` (RAY_ADDRESS), or start a local one.

    RAY_ADDRESS is passed on to every actor of the sweep: Ray Train's placement-group cleaner finds the
    cluster through the state API, which, without it, refuses to choose when several Ray clusters run
    on one host; the cleaner then dies and a trial stopped by ASHA never frees its workers' CPUs.
    """
    import ray

    if ray.is_initialized():
        return
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if os.environ.get("RAY_ADDRESS"):
        env["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
    ray.init(log_to_driver=True, runtime_env={"env_vars": env})


def max_concurrent(cfg: TuneConfig, plans: list[TrialPlan]) -> int:
    """sweep.max_concurrent, or how many trials' worker groups the cluster's CPUs hold (at least 1)."""
    import ray

    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    run = plans[0].train["run"]
    per_trial = run["num_workers"] * run["cpus_per_worker"]
    return max(1, int(ray.cluster_resources().get("CPU", 0) // per_trial))


def _trial_name(trial: Any) -> str:
    return trial.config["plan"]["name"]


def trial_budget(plan: TrialPlan) -> tuple[int, int]:
    """(token budget, tokens per milestone) of a trial."""
    from rrt_ray.train.config import TrainConfig

    train = TrainConfig.from_dict(plan.train)
    return train.optim.max_steps * train.tokens_per_step, train.run.eval_every * train.tokens_per_step


def run_sweep(cfg: TuneConfig, plans: list[TrialPlan], vocab_size: int, tensorboard_dir: str, log: Callable[[str], None] = print) -> Any:
    """Run (or resume) the sweep; return Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    from rrt_ray import storage
    from rrt_ray.train.trainer import ray_storage

    join_cluster()
    storage_path, filesystem = ray_storage(cfg.sweep.storage)
    experiment = storage.join(cfg.sweep.storage, cfg.sweep.name)
    trainable = tune.with_resources(run_trial, {"CPU": 0, "memory": cfg.sweep.trial_memory_mb * 2**20})
    experiment_path = f"{storage_path.rstrip('/')}/{cfg.sweep.name}"  # inside `filesystem` when remote
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        # Finished and errored trials are kept as they are; unfinished ones continue.
        log(f"tune: resuming sweep {cfg.sweep.name} from {experiment}")
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=filesystem)
        return tuner.fit()

    budget, milestone = trial_budget(plans[0])
    scheduler = (
        AsyncHyperBandScheduler(time_attr=ASHA_TIME, max_t=budget, grace_period=cfg.asha.grace_milestones * milestone,
                                reduction_factor=cfg.asha.reduction_factor)
        if cfg.asha.enabled else FIFOScheduler()
    )
    concurrency = max_concurrent(cfg, plans)
    log(f"tune: sweep {cfg.sweep.name}: {len(plans)} trials, {budget:,} tokens each, {concurrency} at a time, "
        f"{'ASHA' if cfg.asha.enabled else 'no early stopping'} on held-out loss every {milestone:,} tokens")
    tuner = tune.Tuner(
        trainable,
        param_space={"plan": tune.grid_search([plan.to_dict() for plan in plans])},
        tune_config=tune.TuneConfig(
            metric="heldout_loss", mode="min", scheduler=scheduler, max_concurrent_trials=concurrency,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=cfg.sweep.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            stop=DivergenceStopper(cfg.asha.diverge_factor * math.log(vocab_size)),
            callbacks=[ProgressCallback(tensorboard_dir, budget, log)],
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    return tuner.fit()

