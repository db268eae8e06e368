"""A sweep end to end, for `jobs/tune.py`: plan (checks, no cluster), run on Ray, write the outputs.

`plan_sweep` raises ValueError (or StorageError) for anything a user can get wrong, before a cluster
is joined. The search space was checked when the TuneConfig was built (no path read); here the storage
paths, the teacher's config and every point's conversion plan are.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from rrt_ray import storage
from rrt_ray.tune import results
from rrt_ray.tune.config import TuneConfig
from rrt_ray.tune.space import TrialPlan, _set, expand, teacher_config


def _absolute(uri: str) -> str:
    """Local paths absolute: under `ray job submit` the driver and the trials run in a per-job copy of
    the working dir, so a relative path would land in a different place on every submission."""
    return uri if storage.is_remote(uri) else str(Path(uri).expanduser().resolve())


def plan_sweep(cfg: TuneConfig) -> tuple[list[TrialPlan], Any]:
    """(the trial plans, the teacher's config), every check done; paths made absolute."""
    from rrt_ray.train.prepare import check_data_source

    cfg.sweep.storage, cfg.sweep.output = _absolute(cfg.sweep.storage), _absolute(cfg.sweep.output)
    for uri in (cfg.sweep.storage, cfg.sweep.output, cfg.train["model"]["teacher"]):
        if storage.is_remote(uri):
            storage.check_s3_access(uri)
    text = teacher_config(cfg.train["model"]["teacher"])
    from rrt_ray.train.prepare import resolve_model

    _set(cfg.train, "model.teacher", resolve_model(cfg.train["model"]["teacher"], "train.model.teacher"))
    _set(cfg.train, "run.storage", storage.join(cfg.sweep.storage, f"{cfg.sweep.name}-trainer"))
    _set(cfg.train, "run.output", storage.join(cfg.sweep.output, cfg.sweep.name, "trials"))
    from rrt_ray.train.config import DataConfig, RunOptions

    for section, leaf, default in (("run", "workdir", RunOptions().workdir), ("data", "cache_dir", DataConfig().cache_dir)):
        _set(cfg.train, f"{section}.{leaf}", _absolute(cfg.train.get(section, {}).get(leaf, default)))
    plans = expand(cfg, text)
    check_data_source(plans[0].train["data"]["source"])
    return plans, text


def output_dir(cfg: TuneConfig) -> str:
    return storage.join(cfg.sweep.output, cfg.sweep.name)


def teacher_heldout_ppl(plan: TrialPlan) -> float:
    """The teacher's perplexity on the trials' held-out set: the first eval_batches x num_workers batches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrt_ray.data import iter_eval_batches
    from rrt_ray.evaluation import perplexity
    from rrt_ray.train.config import TrainConfig
    from rrt_ray.train.data_prep import token_arrays

    cfg = TrainConfig.from_dict(plan.train)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.teacher)
    _, heldout = token_arrays(cfg.data, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.teacher, dtype=torch.float32)
    batches = iter_eval_batches(heldout, cfg.data.seq_len, cfg.data.micro_batch_size)
    return perplexity(model, batches, max_batches=cfg.data.eval_batches * cfg.run.num_workers)


def collect(grid: Any, plans: list[TrialPlan], diverge_limit: float) -> list[dict[str, Any]]:
    """Table rows in trial order from Tune's ResultGrid (plans of trials Tune never reported stay 'not run')."""
    from rrt_ray.train.trainer import _root_cause
    from rrt_ray.tune.runner import trial_budget

    by_name: dict[str, tuple[dict, str | None]] = {}
    for result in grid:
        plan = TrialPlan.from_dict(result.config["plan"])
        error = _root_cause(result.error) if result.error is not None else None
        by_name[plan.name] = (dict(result.metrics or {}), error)
    rows = []
    for plan in plans:
        metrics, error = by_name.get(plan.name, ({}, None))
        rows.append(results.trial_row(plan, metrics, error, trial_budget(plan)[0], diverge_limit))
    results.mark_pareto(rows)
    return rows


def publish_best(best: dict[str, Any], out: str) -> str:
    """Copy the best trial's exported model to <out>/best/<trial> and move <out>/best/latest to it."""
    source = best["export_uri"]
    with tempfile.TemporaryDirectory(prefix="rrt-best-") as scratch:
        local = source
        if storage.is_remote(source):
            local = str(Path(scratch) / "model")
            storage.download_dir(source, local)
        return storage.publish_dir(local, storage.join(out, "best"), best["trial"])


def write_outputs(cfg: TuneConfig, rows: list[dict[str, Any]], plans: list[TrialPlan], teacher_ppl: float, staging: str) -> dict[str, Any]:
    """Table, plot and summary to <output>/<name>/, the best model behind best/latest; the summary dict."""
    out = output_dir(cfg)
    best = results.select_best(rows, cfg.select.max_params_frac)
    summary = {
        "sweep": cfg.sweep.name,
        "trials": len(rows),
        "status": {s: sum(r["status"] == s for r in rows) for s in (results.FINISHED, results.STOPPED, results.FAILED, results.PENDING)},
        "teacher": plans[0].train["model"]["teacher"],
        "teacher_params": plans[0].teacher_params,
        "teacher_heldout_ppl": teacher_ppl,
        "heldout_set": _heldout_description(plans[0]),
        "select": {"metric": cfg.select.metric, "max_params_frac": cfg.select.max_params_frac},
        "best": None if best is None else {k: best[k] for k in ("trial", "params", "params_pct", "heldout_loss", "heldout_ppl")},
    }
    if best is not None:
        summary["best"]["model"] = publish_best(best, out)
    files = {
        "results.csv": results.to_csv(rows),
        "results.md": results.to_markdown(rows),
        "summary.json": json.dumps(summary, indent=2, default=str),
    }
    stage = Path(staging)
    results.plot(rows, teacher_ppl, plans[0].teacher_params, str(stage / "results.png"))
    for name, text in files.items():
        storage.write_text(storage.join(out, name), text)
    storage.write_bytes(storage.join(out, "results.png"), (stage / "results.png").read_bytes())
    return summary


def _heldout_description(plan: TrialPlan) -> str:
    data, run = plan.train["data"], plan.train["run"]
    count = data["eval_batches"] * data["micro_batch_size"] * run["num_workers"]
    return (f"the first {count} sequences of {data['seq_len']} next-token targets of the {data['eval_split']!r} split of "
            f"data.source={data['source']!r} (max_bytes={data['max_bytes']}), tokenized with the teacher's tokenizer")


def run(
    cfg: TuneConfig, plans: list[TrialPlan], text_config: Any, log: Callable[[str], None] = print,
    interrupted: Callable[[], bool] = lambda: False,
) -> dict[str, Any] | None:
    """Run or resume the sweep, write every output, return the summary (None when interrupted: Tune
    has saved the sweep's state, and the same command resumes it)."""
    from rrt_ray.tune.runner import run_sweep

    vocab = int(text_config.get_text_config().vocab_size)
    out = output_dir(cfg)
    local_out = not storage.is_remote(out)
    with tempfile.TemporaryDirectory(prefix="rrt-tune-") as staging:
        tensorboard = str(Path(out) / "tensorboard") if local_out else str(Path(staging) / "tensorboard")
        grid = run_sweep(cfg, plans, vocab, tensorboard, log)
        if interrupted() or grid.num_terminated + grid.num_errors < len(grid):  # Ctrl-C, `ray job stop`
            log(f"tune: interrupted; run the same command to resume sweep {cfg.sweep.name}")
            return None
        rows = collect(grid, plans, cfg.asha.diverge_factor * math.log(vocab))
        summary = write_outputs(cfg, rows, plans, teacher_heldout_ppl(plans[0]), staging)
        if not local_out and Path(tensorboard).is_dir():
            storage.upload_dir(tensorboard, storage.join(out, "tensorboard"))
    for row in rows:
        log(f"tune: {row['trial']}: {row['status']}{' (' + row['note'] + ')' if row['note'] else ''}, "
            f"{row['params']:,} params ({row['params_pct']:.1f}%), held-out loss {row['heldout_loss']:.4f}, "
            f"{row['tokens_seen']:,} tokens{' [pareto]' if row['pareto'] else ''}")
    best = summary["best"]
    log(f"tune: best {best['trial']} (held-out loss {best['heldout_loss']:.4f}, ppl {best['heldout_ppl']:.2f}, "
        f"{best['params_pct']:.1f}% of the teacher) -> {best['model']}" if best else "tune: no trial finished: no best model")
    log(f"tune: done {json.dumps({'out': out, **summary['status']})}")
    return summary
