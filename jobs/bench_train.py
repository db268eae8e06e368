"""Training throughput: Ray Train + DeepSpeed (ZeRO-2, N workers) against a bare single-process PyTorch loop.

    python jobs/bench_train.py [--steps 30] [--workers 2] [--seq-len 256] [--micro-batch 8]

Both arms train the same model (the demo teacher's shape, random init, fp32) on the same packed tokens
with the same global batch (workers x micro-batch sequences per step), AdamW, clipping and schedule.
The bare loop uses all the cores as torch threads; the Ray arm gives each worker cpus/workers threads.
Also measured: the machine's fp32 matmul rate (2048^2, all cores), from which the model FLOP
utilisation (MFU) of each arm follows. Writes results/bench_train.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WARMUP_STEPS = 5  # left out of both arms' rates: allocator and DeepSpeed bucket warm-up


def matmul_gflops(threads: int, size: int = 2048, reps: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def flops_per_token(model, seq_len: int) -> float:
    """6 N (matmul parameters: all but the input embeddings) + 12 L d T for attention (PaLM, appendix B)."""
    config = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def build_model(out: Path, seed: int) -> Path:
    """The demo teacher's shape with a BPE tokenizer (vocab 4096) trained on 2 MB of the default corpus."""
    from rrt_ray import data
    from rrt_ray.train.pretrain import PretrainConfig, init_model_dir

    if (out / "config.json").is_file():
        return out
    tokenizer = data.train_bpe_tokenizer(data.load_texts("default", "train", 2_000_000), 4096)
    return init_model_dir(PretrainConfig.load(None, ["kd.weight=0", f"run.seed={seed}"]), tokenizer, out)


def bare_loop(model_dir: Path, cfg, steps: int, threads: int) -> float:
    """tokens/s of a plain single-process loop over the same data, batch and optimiser."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrt_ray.data import ShardedSequenceLoader
    from rrt_ray.train.data_prep import token_arrays
    from rrt_ray.train.loop import build_optimizer
    from rrt_ray.train.losses import cross_entropy
    from rrt_ray.train.schedule import lr_multiplier

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    tokens, _ = token_arrays(cfg.data, AutoTokenizer.from_pretrained(model_dir))
    global_batch = cfg.data.micro_batch_size * cfg.run.num_workers
    batches = iter(ShardedSequenceLoader(tokens, cfg.data.seq_len, global_batch, 0, 1, cfg.run.seed))
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.max_steps, cfg.optim.min_lr_ratio))
    for step in range(steps):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        batch = next(batches)
        loss = cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return (steps - WARMUP_STEPS) * global_batch * cfg.data.seq_len / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "results" / "bench_train.md"))
    args = parser.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

    import ray
    from transformers import AutoModelForCausalLM

    from rrt_ray.train.config import TrainConfig
    from rrt_ray.train.trainer import fit

    cpus = os.cpu_count() or 1
    work = REPO / ".cache" / "bench_train"
    model_dir = build_model(work / "model", seed=0)
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-", dir=work))
    cfg = TrainConfig.load(None, [
        f"model.student={model_dir}", "kd.weight=0", "zero.stage=2", "zero.precision=fp32",
        "data.source=default", "data.max_bytes=2000000", f"data.seq_len={args.seq_len}",
        f"data.micro_batch_size={args.micro_batch}", "data.eval_batches=0", f"data.cache_dir={work / 'tokens'}",
        "optim.warmup_steps=2", f"optim.max_steps={args.steps}",
        f"run.num_workers={args.workers}", f"run.cpus_per_worker={max(1, cpus // args.workers)}",
        f"run.name=bench-{int(time.time())}", f"run.storage={scratch / 'runs'}", f"run.output={scratch / 'out'}",
        f"run.workdir={scratch / 'work'}", "run.checkpoint_every=0", "run.eval_every=0",
        f"run.log_every={WARMUP_STEPS}", "run.verify_export=false",
    ])
    per_token = flops_per_token(AutoModelForCausalLM.from_pretrained(model_dir), args.seq_len)
    # The fp32 matmul rate is measured next to each arm: on a shared machine it moves with the load.
    peaks = [matmul_gflops(cpus)]
    bare = bare_loop(model_dir, cfg, args.steps, cpus)
    peaks.append(matmul_gflops(cpus))
    print(f"bench_train: bare PyTorch loop {bare:,.0f} tokens/s (matmul {peaks[0]:.0f} / {peaks[1]:.0f} GFLOP/s)", flush=True)
    ray.init(num_cpus=cpus, log_to_driver=False)
    ray_rate = fit(cfg)["tokens_per_s_mean"]
    ray.shutdown()
    peaks.append(matmul_gflops(cpus))
    print(f"bench_train: Ray Train + DeepSpeed ZeRO-2 x{args.workers} {ray_rate:,.0f} tokens/s (matmul {peaks[2]:.0f} GFLOP/s after)", flush=True)

    peak = max(peaks)
    rows = [("bare PyTorch, 1 process", bare), (f"Ray Train + DeepSpeed ZeRO-2, {args.workers} workers", ray_rate)]
    lines = [
        "# Training throughput: Ray Train + DeepSpeed vs a bare PyTorch loop",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', 'jobs/bench_train.py', *sys.argv[1:]])}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {cpus} CPU cores, no GPU, 1-minute load average at the end {os.getloadavg()[0]:.1f}",
        f"- fp32 matmul (2048x2048, {cpus} threads) before the bare arm / between the arms / after the Ray arm: "
        + " / ".join(f"{p:.0f}" for p in peaks) + f" GFLOP/s; MFU below is against the best, {peak:.0f} GFLOP/s",
        f"- model: demo teacher shape (Llama, 8 layers, hidden 256, vocab 4096), fp32, {per_token / 6e6:.1f}M matmul parameters",
        f"- batch: {args.workers * args.micro_batch} x {args.seq_len} tokens per step ({args.workers} workers x {args.micro_batch} "
        f"in the Ray arm, one batch of {args.workers * args.micro_batch} in the bare arm), {args.steps} steps, first {WARMUP_STEPS} left out",
        f"- FLOPs per token: 6N + 12 L d T = {per_token / 1e6:.1f} MFLOP",
        "",
        "| arm | tokens/s | model GFLOP/s | MFU | vs bare |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rate in rows:
        lines.append(f"| {name} | {rate:,.0f} | {rate * per_token / 1e9:.1f} | {rate * per_token / 1e9 / peak:.1%} | {rate / bare:.2f}x |")
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
