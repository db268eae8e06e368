"""`make demo`: the whole pipeline on the embedded default corpus, on a private local Ray head, with a summary.

    python jobs/demo.py [--quick] [--steps N] [--workdir out/demo] [--teacher-root DIR]

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
# Seconds per stage, sized for 2 idle cores with the teacher cached (pretraining fresh: ~3 min more).
BUDGETS = {"ray head": 45, "teacher": 240, "convert": 45, "uptrain": 200, "tune": 200, "early exit": 120, "evaluate": 45, "serve": 120}
QUICK = {"steps": 4, "tune_tokens": 8192, "exit_steps": 4}
FULL = {"steps": None, "tune_tokens": 16384, "exit_steps": 30}


def log(line: str) -> None:
    print(f"      {line}", flush=True)


def heldout_ppl(model_dir: str, heldout, seq_len: int) -> tuple[int, float]:
    """(parameters, held-out perplexity) of a saved model."""
    import torch
    from transformers import AutoModelForCausalLM

    from rrt_ray import data
    from rrt_ray.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return sum(p.numel() for p in model.parameters()), perplexity(model, data.iter_eval_batches(heldout, seq_len, batch_size=8))


def pipeline(args, sizes, stages, head, work: Path) -> None:
    import ray
    import rrt_ray  # noqa: F401  (registers the recursive model with the Auto classes)
    from transformers import AutoTokenizer

    from rrt_ray import data
    from rrt_ray import demo as stage_lib
    from rrt_ray.serve.launch import install_stop_handlers
    from rrt_ray.train.config import TrainConfig
    from rrt_ray.train.prepare import convert_teacher, preflight, resolve_model
    from rrt_ray.train.pretrain import PretrainConfig, pretrain_teacher
    from rrt_ray.train.trainer import fit
    from rrt_ray.tune import sweep
    from rrt_ray.tune.config import TuneConfig

    paths = [f"run.storage={work / 'runs'}", f"run.workdir={work / 'tmp'}", f"data.cache_dir={REPO / '.cache/tokens'}"]
    stages.run("ray head", head.start)
    ray.init(address=head.gcs_address, log_to_driver=False)
    install_stop_handlers()  # ray.init replaced the SIGTERM handler
    log(f"Ray head {head.gcs_address}, dashboard {head.dashboard_url}, temp dir {head.temp_dir}")
    pre = PretrainConfig.load(str(CONFIGS / "pretrain_demo.yaml"), [f"run.output={args.teacher_root or work / 'teacher'}", *paths])
    teacher = stages.run("teacher", lambda: pretrain_teacher(pre, log=log))

    n = args.steps or sizes["steps"]
    steps = [f"optim.max_steps={n}", f"optim.warmup_steps={min(10, n // 4)}", f"run.eval_every={n}", f"run.checkpoint_every={n}"] if n else []
    cfg = preflight(TrainConfig.load(str(CONFIGS / "demo.yaml"), [f"model.teacher={teacher}", f"run.output={work / 'uptrained'}", *paths, *steps]))
    cfg.model.student = stages.run("convert", lambda: convert_teacher(cfg, log=log))

    entry = (f"cd {REPO} && exec {sys.executable} jobs/uptrain.py --config jobs/configs/demo.yaml model.teacher={teacher} "
             f"model.student={cfg.model.student} run.output={work / 'uptrained'} run.name=uptrain-demo-{int(time.time())} "
             + " ".join([*paths, *steps]))
    logs = stages.run("uptrain", lambda: stage_lib.submit_job(head.dashboard_url, entry, {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}, log))
    uptrain = stage_lib.job_summary(logs)

    tune_cfg = TuneConfig.load(str(CONFIGS / "tune_demo.yaml"), [
        f"train.model.teacher={teacher}", "space.model.lora_rank=[8, 64]", "space.model.init=[average]",
        f"budget.tokens={sizes['tune_tokens']}", "budget.milestones=2", "asha.enabled=false", "train.optim.warmup_steps=1",
        f"sweep.storage={work / 'runs/tune'}", f"sweep.output={work / 'tune'}", f"sweep.name=tune-demo-{int(time.time())}"])
    tuned = stages.run("tune", lambda: sweep.run(tune_cfg, *sweep.plan_sweep(tune_cfg), log=log))
    best = tuned["best"]["model"] if tuned and tuned["best"] else None
    exit_model = None
    if best is None:
        stages.skip("early exit", "the sweep produced no best model")
    else:
        ee = preflight(TrainConfig.load(str(CONFIGS / "demo_early_exit.yaml"), [
            f"model.teacher={teacher}", f"model.student={best}", f"optim.max_steps={sizes['exit_steps']}", "optim.warmup_steps=2",
            f"run.output={work / 'early-exit'}", f"run.name=early-exit-{int(time.time())}", *paths]))
        exit_model = stages.run("early exit", lambda: fit(ee))["export_uri"]

    heldout = data.tokenize_cached(data.load_texts(cfg.data.source, "heldout", cfg.data.max_bytes),
                                   AutoTokenizer.from_pretrained(resolve_model(teacher, 'teacher')), cfg.data.cache_dir)
    candidates = [("teacher (original)", teacher), (f"converted, {cfg.model.loops} loops, rank {cfg.model.lora_rank}", cfg.model.student),
                  ("uptrained with KD (ray job)", uptrain["export_uri"]), ("tune winner", best), ("winner + early exit", exit_model)]
    models = stages.run("evaluate", lambda: [(name, *heldout_ppl(resolve_model(uri, name), heldout, cfg.data.seq_len)) for name, uri in candidates if uri])

    ray.shutdown()  # the launcher connects on its own
    served = stages.run("serve", lambda: stage_lib.serve_and_query(exit_model or uptrain["export_uri"], head.gcs_address, log))
    out_dir = sweep.output_dir(tune_cfg)
    facts = [("uptraining tokens/s (2 workers, ZeRO-2)", f"{uptrain.get('tokens_per_s') or 0:.0f}"),
             ("serving tokens/s (1 replica, batch 1)", f"{served['serving_tokens_per_s']:.1f}"),
             (f"exit-depth mix (threshold {served['exit_threshold']})", ", ".join(f"loop {k}: {v}" for k, v in served["exit_loops"].items()) or "-"),
             ("tune plot", f"{out_dir}/results.png"), ("tune table", f"{out_dir}/results.md")]
    stage_lib.print_summary(models, facts, stages, time.perf_counter() - args.started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets everywhere (a smoke run, used by the tests)")
    parser.add_argument("--steps", type=int, default=None, help="uptraining steps (default: jobs/configs/demo.yaml)")
    parser.add_argument("--workdir", default="out/demo", help="where the teacher, students, runs and sweep go")
    parser.add_argument("--teacher-root", default=None, help="a published teacher root to reuse (default: <workdir>/teacher)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        print(f"demo: error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    args.started = time.perf_counter()
    from rrt_ray.demo import RayHead, Stages
    from rrt_ray.serve.launch import Stopped, install_stop_handlers

    install_stop_handlers()
    stages, head = Stages(dict(BUDGETS)), RayHead(num_cpus=2)
    try:
        pipeline(args, QUICK if args.quick else FULL, stages, head, Path(args.workdir).resolve())
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
