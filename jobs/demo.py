"""`make demo`: the whole pipeline on the embedded default, on a local Ray cluster, with a summary.

    python jobs/demo.py [--steps N] [--workdir out/demo]

1. start a local Ray cluster (2 CPUs)
2. pretrain the demo teacher, a small Llama, on the embedded CPython-stdlib corpus (cached by content)
3. convert it: check that a full-rank conversion reproduces it, then build the 2-loop relaxed student
4. uptrain the student with distillation from the teacher (Ray Train + DeepSpeed ZeRO-2, 2 workers)
5. print held-out perplexity and size of teacher, converted student and uptrained student
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import rrt_ray  # noqa: F401  (registers the recursive model with the Auto classes)
from rrt_ray import data, storage
from rrt_ray.convert import convert_checkpoint
from rrt_ray.evaluation import perplexity

CONFIGS = Path(__file__).resolve().parent / "configs"


def heldout_ppl(model_dir: str, tokens, seq_len: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return perplexity(model, data.iter_eval_batches(tokens, seq_len, batch_size=8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="uptraining steps (default: jobs/configs/demo.yaml)")
    parser.add_argument("--workdir", default="out/demo", help="where the teacher, student and runs go")
    args = parser.parse_args(argv)
    import ray

    from rrt_ray.train.config import TrainConfig
    from rrt_ray.train.prepare import convert_teacher, preflight
    from rrt_ray.train.pretrain import PretrainConfig, pretrain_teacher
    from rrt_ray.train.trainer import fit, worker_env

    work = Path(args.workdir).resolve()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    pre = PretrainConfig.load(str(CONFIGS / "pretrain_demo.yaml"), [f"run.output={work / 'teacher'}", f"run.storage={work / 'runs'}", f"run.workdir={work / 'tmp'}"])
    ray.init(num_cpus=2, include_dashboard=True, runtime_env={"env_vars": worker_env(pre)}, log_to_driver=False)
    print(f"[1/4] local Ray cluster: {ray.cluster_resources().get('CPU', 0):.0f} CPUs")

    teacher = pretrain_teacher(pre, log=lambda line: print(f"      {line}", flush=True))
    timings["pretrain"] = time.perf_counter() - started
    print(f"[2/4] teacher: {teacher}")

    overrides = [f"model.teacher={teacher}", f"run.output={work / 'uptrained'}", f"run.storage={work / 'runs'}", f"run.workdir={work / 'tmp'}"]
    if args.steps is not None:
        overrides.append(f"optim.max_steps={args.steps}")
    cfg = preflight(TrainConfig.load(str(CONFIGS / "demo.yaml"), overrides))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.teacher)
    heldout = data.tokenize_cached(data.load_texts(cfg.data.source, "heldout", cfg.data.max_bytes), tokenizer, cfg.data.cache_dir)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:  # exactness check: full rank must reproduce the teacher
        report = convert_checkpoint(cfg.model.teacher, f"{scratch}/full", loops=cfg.model.loops, lora_rank="full", progress=False)
        original = AutoModelForCausalLM.from_pretrained(cfg.model.teacher, dtype=torch.float32).eval()
        full = AutoModelForCausalLM.from_pretrained(f"{scratch}/full", dtype=torch.float32).eval()
        batch = next(data.iter_eval_batches(heldout, cfg.data.seq_len, batch_size=4))["input_ids"]
        with torch.no_grad():
            exact_diff = (original(batch).logits - full(batch).logits).abs().max().item()
    cfg.model.student = convert_teacher(cfg, log=lambda line: print(f"      {line}", flush=True))
    student = AutoModelForCausalLM.from_pretrained(cfg.model.student)
    counts = student.parameter_counts()
    timings["convert"] = time.perf_counter() - t0
    print(f"[3/4] converted: full-rank max |logit diff| {exact_diff:.2e}; student {cfg.model.student}")

    t0 = time.perf_counter()
    metrics = fit(cfg)
    timings["uptrain"] = time.perf_counter() - t0
    uptrained = storage.read_latest(cfg.run.output) or metrics["export_uri"]
    print(f"[4/4] uptrained: {uptrained}")

    rows = [
        ("teacher (original)", report.original_params, heldout_ppl(cfg.model.teacher, heldout, cfg.data.seq_len)),
        (f"converted, {cfg.model.loops} loops, rank {cfg.model.lora_rank}", counts["total"], heldout_ppl(cfg.model.student, heldout, cfg.data.seq_len)),
        ("uptrained with KD", counts["total"], heldout_ppl(uptrained, heldout, cfg.data.seq_len)),
    ]
    ray.shutdown()
    print("\n== rrt-ray demo summary ==")
    print(f"{'model':<34}{'parameters':>12}{'held-out ppl':>14}")
    for name, params, ppl in rows:
        print(f"{name:<34}{params:>12,}{ppl:>14.2f}")
    print(f"full-rank conversion reproduces the teacher: max |logit diff| = {exact_diff:.1e}")
    print("(the demo teacher is pretrained only briefly: uptraining continues language-model training on the same")
    print(" corpus as well as distilling, so the smaller student can end below the teacher's perplexity)")
    print(f"uptraining: {metrics.get('step')} steps, {metrics.get('tokens_per_s', 0):.0f} tokens/s on "
          f"{cfg.run.num_workers} workers (ZeRO-{cfg.zero.stage}, KD {cfg.kd.loss} weight {cfg.kd.weight})")
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
