"""`make demo`: the whole pipeline on the embedded default corpus, on a private local Ray head, with a summary.

    python jobs/demo.py [--quick] [--steps N] [--workdir out/demo] [--teacher-root DIR]
    python jobs/demo.py --model smollm2-135m        (`make demo MODEL=smollm2-135m`: a real model as teacher)

ray head -> teacher (pretrained, or reused: cached by content) -> convert -> `ray job submit` the uptraining
with distillation -> a 2-trial Ray Tune sweep -> early-exit post-training of the winner -> Ray Serve on
127.0.0.1 and completions with the `openai` client -> summary (parameters, held-out perplexities, tokens/s,
exit-depth mix, plot path, each stage's time against its budget). A progress line at least every 10 s.
Stops the cluster it started on success, on error and on Ctrl-C / SIGTERM (stage logic: rrt_ray/demo.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

for _sig in (signal.SIGINT, signal.SIGTERM):  # before the slow imports: either signal interrupts them
    signal.signal(_sig, signal.default_int_handler)
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
# Seconds per stage on 2 idle cores. Measured 2026-12-01 with the teacher cached (results/demo_timing.md): ray head
# 13, convert 2, uptrain 442 (90 s of it building DeepSpeed's shm_comm op, once per machine), tune 173, early exit
# 112, evaluate 68, serve 29; 14 min 20 s in all. Pretraining the teacher fresh adds ~3 min.
BUDGETS = {"ray head": 30, "teacher": 240, "convert": 30, "uptrain": 360, "tune": 200, "early exit": 120, "evaluate": 75, "serve": 60}
# calibrate: model.calibrate of the conversion; eval_batches: held-out batches per evaluation (None: the whole split)
QUICK = {"steps": 4, "tune_tokens": 8192, "exit_steps": 4, "calibrate": 0, "eval_batches": None}
FULL = {"steps": None, "tune_tokens": 16384, "exit_steps": 30, "calibrate": 0, "eval_batches": None}
# A real packaged model (--model, `rrt fetch`). Its plain-SVD conversion starts at perplexity ~10^6, so it is
# calibrated; a few uptraining steps (a 135M teacher + student per worker: ~40 tokens/s with start-up); no sweep.
# Measured 2026-12-01 on 2 idle cores, first fetch included (results/demo_timing.md): ray head 14, teacher 62,
# convert 211, uptrain 390, early exit 286, evaluate 74, serve 57; 18 min 40 s in all. The budgets sum to 20 min.
REAL = {"steps": 4, "tune_tokens": None, "exit_steps": 4, "calibrate": 8, "eval_batches": 4}
REAL_BUDGETS = {**BUDGETS, "ray head": 20, "teacher": 90, "convert": 230, "uptrain": 410, "tune": 0, "early exit": 300, "evaluate": 80, "serve": 70}


def log(line: str) -> None:
    print(f"      {line}", flush=True)


def pipeline(args, sizes, stages, head, work: Path) -> None:
    import ray
    import rrt_ray  # noqa: F401  (registers the recursive model with the Auto classes)

    from rrt_ray import demo as stage_lib
    from rrt_ray.serve.launch import install_stop_handlers
    from rrt_ray.train.config import TrainConfig
    from rrt_ray.train.prepare import convert_teacher, preflight
    from rrt_ray.tune import sweep
    from rrt_ray.tune.config import TuneConfig

    paths = [f"run.storage={work / 'runs'}", f"run.workdir={work / 'tmp'}", f"data.cache_dir={REPO / '.cache/tokens'}"]
    stages.run("ray head", head.start)
    ray.init(address=head.gcs_address, log_to_driver=False)
    install_stop_handlers()  # ray.init replaced the SIGTERM handler
    log(f"Ray head {head.gcs_address}, dashboard {head.dashboard_url}, temp dir {head.temp_dir}")
    teacher = stages.run("teacher", lambda: stage_lib.get_teacher(args.model, args.teacher_root or work / 'teacher', CONFIGS, paths, log))

    n = args.steps or sizes["steps"]
    steps = [f"optim.max_steps={n}", f"optim.warmup_steps={min(10, n // 4)}", f"run.eval_every={n}", f"run.checkpoint_every={n}"] if n else []
    steps += [f"model.calibrate={sizes['calibrate']}"] + ([f"data.eval_batches={sizes['eval_batches']}"] if sizes["eval_batches"] else [])
    cfg = preflight(TrainConfig.load(str(CONFIGS / "demo.yaml"), [f"model.teacher={teacher}", f"run.output={work / 'uptrained'}", *paths, *steps]))
    cfg.model.student = stages.run("convert", lambda: convert_teacher(cfg, log=log))

    entry = (f"cd {REPO} && exec {sys.executable} jobs/uptrain.py --config jobs/configs/demo.yaml model.teacher={teacher} "
             f"model.student={cfg.model.student} run.output={work / 'uptrained'} run.name=uptrain-demo-{int(time.time())} "
             + " ".join([*paths, *steps]))
    logs = stages.run("uptrain", lambda: stage_lib.submit_job(head.dashboard_url, entry, {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}, log))
    uptrain = stage_lib.job_summary(logs)

    if sizes["tune_tokens"] is None:
        stages.skip("tune", f"a sweep on {args.model} does not fit this demo's budget (run jobs/tune.py with train.model.teacher)")
        return _after_sweep(args, sizes, stages, head, work, paths, teacher, cfg, uptrain, None, None)
    tune_cfg = TuneConfig.load(str(CONFIGS / "tune_demo.yaml"), [
        f"train.model.teacher={teacher}", "space.model.lora_rank=[8, 64]", "space.model.init=[average]",
        f"budget.tokens={sizes['tune_tokens']}", "budget.milestones=2", "asha.enabled=false", "train.optim.warmup_steps=1",
        f"sweep.storage={work / 'runs/tune'}", f"sweep.output={work / 'tune'}", f"sweep.name=tune-demo-{int(time.time())}"])
    tuned = stages.run("tune", lambda: sweep.run(tune_cfg, *sweep.plan_sweep(tune_cfg), log=log))
    best = tuned["best"]["model"] if tuned and tuned["best"] else None
    _after_sweep(args, sizes, stages, head, work, paths, teacher, cfg, uptrain, best, sweep.output_dir(tune_cfg))


def _after_sweep(args, sizes, stages, head, work: Path, paths, teacher, cfg, uptrain, best, sweep_dir) -> None:
    """Early-exit post-training of the winner (the uptrained model without a sweep), evaluation, serving, summary."""
    import ray
    from transformers import AutoTokenizer

    from rrt_ray import data
    from rrt_ray import demo as stage_lib
    from rrt_ray.train.config import TrainConfig
    from rrt_ray.train.prepare import preflight, resolve_model
    from rrt_ray.train.trainer import fit

    winner = best or (uptrain["export_uri"] if sweep_dir is None else None)
    exit_model = None
    if winner is None:
        stages.skip("early exit", "the sweep produced no best model")
    else:
        ee = preflight(TrainConfig.load(str(CONFIGS / "demo_early_exit.yaml"), [
            f"model.teacher={teacher}", f"model.student={winner}", f"optim.max_steps={sizes['exit_steps']}", "optim.warmup_steps=2",
            f"run.output={work / 'early-exit'}", f"run.name=early-exit-{int(time.time())}", *paths,
            *([f"data.eval_batches={sizes['eval_batches']}"] if sizes["eval_batches"] else [])]))
        exit_model = stages.run("early exit", lambda: fit(ee))["export_uri"]

    heldout = data.tokenize_cached(data.load_texts(cfg.data.source, "heldout", cfg.data.max_bytes),
                                   AutoTokenizer.from_pretrained(resolve_model(teacher, 'teacher')), cfg.data.cache_dir)
    candidates = [("teacher (original)", teacher), (f"converted, {cfg.model.loops} loops, rank {cfg.model.lora_rank}", cfg.model.student),
                  ("uptrained with KD (ray job)", uptrain["export_uri"]), ("tune winner", best), ("winner + early exit", exit_model)]
    models = stages.run("evaluate", lambda: [(name, *stage_lib.heldout_ppl(resolve_model(uri, name), heldout, cfg.data.seq_len, sizes["eval_batches"]))
                                             for name, uri in candidates if uri])

    ray.shutdown()  # the launcher connects on its own
    served = stages.run("serve", lambda: stage_lib.serve_and_query(exit_model or uptrain["export_uri"], head.gcs_address, log))
    facts = [("uptraining tokens/s (2 workers, ZeRO-2)", f"{uptrain.get('tokens_per_s') or 0:.0f}"),
             ("serving tokens/s (1 replica, batch 1)", f"{served['serving_tokens_per_s']:.1f}"),
             (f"exit-depth mix (threshold {served['exit_threshold']})", ", ".join(f"loop {k}: {v}" for k, v in served["exit_loops"].items()) or "-"),
             *([("tune plot", f"{sweep_dir}/results.png"), ("tune table", f"{sweep_dir}/results.md")] if sweep_dir else [])]
    stage_lib.print_summary(models, facts, stages, time.perf_counter() - args.started)


def main(argv: list[str] | None = None) -> int:
    from rrt_ray.convert.fetch import PACKAGED_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets everywhere (a smoke run, used by the tests)")
    parser.add_argument("--steps", type=int, default=None, help="uptraining steps (default: jobs/configs/demo.yaml)")
    parser.add_argument("--workdir", default="out/demo", help="where the teacher, students, runs and sweep go")
    parser.add_argument("--teacher-root", default=None, help="a published teacher root to reuse (default: <workdir>/teacher)")
    parser.add_argument("--model", default=None, help=f"a packaged real model as the teacher instead of the demo's "
                        f"({', '.join(PACKAGED_MODELS)}); calibrated conversion, a few steps, no sweep, ~20 min")
    args = parser.parse_args(argv)
    if args.model is not None and args.model not in PACKAGED_MODELS:
        print(f"demo: error: --model {args.model!r} is not a packaged model; allowed: {', '.join(PACKAGED_MODELS)}", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print(f"demo: error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    args.started = time.perf_counter()
    from rrt_ray.demo import RayHead, Stages
    from rrt_ray.serve.launch import Stopped, install_stop_handlers

    install_stop_handlers()
    stages, head = Stages(dict(REAL_BUDGETS if args.model else BUDGETS)), RayHead(num_cpus=2)
    sizes = REAL if args.model else QUICK if args.quick else FULL
    try:
        pipeline(args, sizes, stages, head, Path(args.workdir).resolve())
        return 0
    except (Stopped, KeyboardInterrupt) as stop:
        print(f"demo: interrupted ({getattr(stop, 'signum', 'SIGINT')}): stopping the Ray head", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        left = head.stop()
        print(f"demo: Ray head stopped; {len(left)} of its processes left{': ' + str(left) if left else ''}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
