"""Where a training worker's memory goes, and what each memory setting saves (issue 11, item 7).

    python jobs/bench_train_memory.py --teacher out/models/smollm2-135m [--steps 3] [--arms whole,chunked,...]

Each arm starts two fresh ranks (gloo, as the 2 Ray Train workers of the demo) that run the worker's own code
(train/loop.py: load_models, load_data, build_engine, micro_batch_loss) with jobs/configs/demo.yaml's sizes
(ZeRO-2, fp32, 8 x 128 tokens a micro-batch, KD from the teacher), and reads VmHWM after every phase, resetting
it in between (/proc/self/clear_refs), so each phase's own peak shows. The student is the teacher converted
with 2 loops and rank-64 plain SVD (memory does not depend on how the LoRA was initialised). "States" is what
the issue counts: the student's fp32 weights, gradients and two Adam moments (16 bytes a parameter) plus the
frozen teacher's weights. The settings are the trainer's own: model.loss_chunk_tokens, model.gradient_checkpointing,
run.trim_heap, zero.bucket_size and run.mmap_threshold_mb (train/config.py). Writes results/bench_train_memory.md,
and each arm's raw measurements to its .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

GC, TRIM = ["model.gradient_checkpointing=true"], ["run.trim_heap=true"]
MMAP, SMALL_BUCKET = ["run.mmap_threshold_mb=1"], ["zero.bucket_size=10000000"]
# name -> (config overrides, what it is)
ARMS: dict[str, tuple[list[str], str]] = {
    "whole": (["model.loss_chunk_tokens=0"], "whole-batch loss (before)"),
    "chunked": ([], "chunked LM head + loss (the default, 256 tokens a chunk)"),
    "chunked+gc": (GC, "chunked + gradient checkpointing per unrolled layer"),
    "chunked+gc+mmap": (GC + MMAP, "chunked + checkpointing, glibc mmap threshold 1 MiB"),
    "chunked+gc+trim": (GC + TRIM, "chunked + checkpointing, heap trimmed between the phases (run.trim_heap)"),
    "chunked+gc+trim+bucket": (GC + TRIM + SMALL_BUCKET, "chunked + checkpointing + trim, ZeRO buckets of 10M elements, not 50M"),
    "low-memory": (GC + TRIM + SMALL_BUCKET + MMAP, "the four settings on the chunked default: checkpointing + trim + 10M buckets + mmap threshold 1 MiB"),
}
PHASES = ("imports", "models loaded", "data", "engine built", "forward+loss", "backward", "optimizer step")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_main(rank: int, world: int, port: int, overrides: list[str], steps: int, queue) -> None:
    """One rank: the worker's phases, each phase's peak RSS (MiB) and the steady steps' time, put on queue."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from rrt_ray.train.memory import reset_peak, resident_memory

    peaks: dict[str, float] = {}

    def mark(phase: str) -> None:  # the phase's own peak (max over steps), then a fresh peak for the next
        peaks[phase] = max(peaks.get(phase, 0.0), resident_memory()["peak_rss_mb"])
        reset_peak()

    reset_peak()
    import torch
    import torch.distributed as dist

    from rrt_ray.devices import configure_accelerator

    torch.set_num_threads(1)
    configure_accelerator()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from rrt_ray.train import loop
    from rrt_ray.train.config import TrainConfig

    mark("imports")
    cfg = TrainConfig.load(REPO / "jobs" / "configs" / "demo.yaml", overrides)
    loop.configure_allocator(cfg)  # as loop.setup_worker does
    tokenizer, model, teacher = loop.load_models(cfg, Path(cfg.run.workdir) / f"worker{rank}")
    mark("models loaded")
    batches, _ = loop.load_data(cfg, tokenizer, rank, world)
    mark("data")
    engine, _ = loop.build_engine(model, cfg, world)
    mark("engine built")
    step_seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        terms = loop.micro_batch_loss(engine, teacher, batches.next(), cfg)
        loop.trim_heap(cfg)  # as loop.train does, with run.trim_heap
        mark("forward+loss")
        engine.backward(terms["loss"])
        loop.trim_heap(cfg)
        mark("backward")
        engine.step()
        loop.trim_heap(cfg)
        mark("optimizer step")
        step_seconds.append(time.perf_counter() - start)
    dist.barrier()
    final = resident_memory()
    queue.put({"rank": rank, "peaks": peaks, "step_seconds": step_seconds, "file_mb": final["file_mb"], "anon_mb": final["anon_mb"],
               "loss": terms["loss"].item(), "tokens_per_step": cfg.data.micro_batch_size * cfg.data.seq_len * world})
    dist.destroy_process_group()


def run_arm(name: str, base: list[str], steps: int) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=rank_main, args=(rank, 2, port, base + ARMS[name][0], steps, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"arm {name}: a rank exited {proc.exitcode}")
    return {"name": name, "ranks": sorted(results, key=lambda r: r["rank"])}


def states_mb(student: str, teacher: str) -> tuple[float, float]:
    """(student parameters x 16 bytes, teacher parameters x 4 bytes) in MiB, counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import rrt_ray  # noqa: F401  (registers the recursive model class)

    def count(path: str) -> int:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).num_parameters()

    return count(student) * 16 / 2**20, count(teacher) * 4 / 2**20


def student_dir(teacher: str, out: Path) -> str:
    from rrt_ray.convert import convert_checkpoint

    if not (out / "config.json").is_file():
        convert_checkpoint(teacher, str(out), loops=2, init="average", lora_rank=64, progress=False)
    return str(out)


def write_report(path: Path, arms: list[dict], states: tuple[float, float], steps: int) -> str:
    student_states, teacher_weights = states
    total_states = student_states + teacher_weights
    lines = [
        "# Training memory per worker: where it goes (issue 11, item 7)",
        "",
        *[f"- command: `{c}`" for c in dict.fromkeys(a.get("command", "") for a in arms)],
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: {os.cpu_count()} CPU cores, load average at the end {os.getloadavg()[0]:.1f}",
        "- two ranks (gloo) running the worker's own code with jobs/configs/demo.yaml's sizes: ZeRO-2, fp32, 8 x 128 tokens a",
        f"  micro-batch per worker, KD from the teacher; {steps} steps; each phase's peak is VmHWM reset at the phase's start (max over steps)",
        f"- states: student {student_states:,.0f} MiB (fp32 weights, gradients, two Adam moments) + teacher weights {teacher_weights:,.0f} MiB"
        f" = **{total_states:,.0f} MiB**; the target, 1.5x the states: **{1.5 * total_states:,.0f} MiB**",
        "",
        "Peak RSS per phase (MiB, the larger of the two ranks):",
        "",
        "| arm | " + " | ".join(PHASES) + " | peak | vs states | file-backed at end | s/step | vs first |",
        "|---|" + "---:|" * (len(PHASES) + 5),
    ]
    first_rate = None
    for arm in arms:
        ranks = arm["ranks"]
        peaks = [max(r["peaks"].get(p, 0.0) for r in ranks) for p in PHASES]
        steady = [sum(r["step_seconds"][1:]) / max(1, len(r["step_seconds"]) - 1) for r in ranks]
        seconds = max(steady)
        first_rate = first_rate or seconds
        lines.append(f"| {ARMS[arm['name']][1]} | " + " | ".join(f"{p:,.0f}" for p in peaks)
                     + f" | **{max(peaks):,.0f}** | {max(peaks) / total_states:.2f}x | {max(r['file_mb'] for r in ranks):,.0f}"
                     + f" | {seconds:.1f} | {first_rate / seconds:.2f}x |")
    lines += ["", "s/step leaves out the first step (allocation); 'vs first' is the first arm's time over this arm's (higher is faster).",
              "Losses at the last step (same data, same seed): " + ", ".join(f"{a['name']} {a['ranks'][0]['loss']:.4f}" for a in arms) + "."]
    path.write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="a Hugging Face model directory (e.g. out/models/smollm2-135m)")
    parser.add_argument("--student", help="a converted student directory (default: the teacher at 2 loops, rank 64, converted here)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from: {', '.join(ARMS)}")
    parser.add_argument("--workdir", default=str(REPO / "out" / "bench_train_memory"))
    parser.add_argument("--out", default=str(REPO / "results" / "bench_train_memory.md"))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.arms.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        parser.error(f"unknown arm(s) {', '.join(unknown) or '(none given)'}; allowed: {', '.join(ARMS)}")
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (the first step is left out of the time), got {args.steps}")
    if not (Path(args.teacher) / "config.json").is_file():
        parser.error(f"--teacher {args.teacher}: not a Hugging Face model directory (no config.json); `rrt fetch smollm2-135m` puts one in out/models")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.workdir)
    student = args.student or student_dir(args.teacher, work / "student")
    base = [f"model.teacher={args.teacher}", f"model.student={student}", f"run.workdir={work / 'run'}"]
    command = "python jobs/bench_train_memory.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    # each arm's measurements, kept beside the report (not under the ignored workdir) as it finishes: arms not
    # named now stay in the report, also on a fresh machine, so a later run adds arms without rerunning the others
    kept = Path(args.out).with_suffix(".json")
    arms = [a for a in (json.loads(kept.read_text()) if kept.is_file() else []) if a["name"] in ARMS and a["name"] not in names]
    for name in names:
        print(f"arm {name}: {ARMS[name][1]}", flush=True)
        arms.append({**run_arm(name, base, args.steps), "command": command})
        kept.write_text(json.dumps(arms, indent=1))
    arms.sort(key=lambda a: list(ARMS).index(a["name"]))
    print(write_report(Path(args.out), arms, states_mb(student, args.teacher), args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
