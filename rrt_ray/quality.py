"""The quality study on a real checkpoint (jobs/bench_quality.py): arms, the held-out yardstick, the table.

Every arm is a real `convert_checkpoint` call on the teacher with its options, then held-out perplexity on
the first `windows` 256-token windows of the default corpus's held-out split (the yardstick; the training
split alone is used for calibration). Rows are appended to a JSON-lines file as each arm finishes, keyed by
the arm's name and options, so an interrupted study resumes where it stopped and a finished arm is never
rerun unless asked (`rerun`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

SEQ_LEN = 256
# (a): the DESIGN prototype's 32 x 256 training-split tokens, every position fitted on the original's inputs
CALIBRATION = {"sequences": 32, "seq_len": SEQ_LEN, "inputs": "original"}
# (a) fitted in order on the recursive model's own inputs, correcting the drift (calibrate.py; the default)
SEQUENTIAL = {**CALIBRATION, "inputs": "recursive_corrected"}
RECONSTRUCTION = {**CALIBRATION, "reconstruct": True, "reconstruct_steps": 10}
# (a)+(b) as the converter defaults now do it: drift-corrected inputs, positions reconstructed in order, each judged
# on a held-out calibration batch (calibrate.py)
SEQ_RECONSTRUCTION = {**SEQUENTIAL, "reconstruct": True}


@dataclass(frozen=True)
class Arm:
    name: str
    group: str  # "conversion" (5a) or "reference"
    options: dict = field(default_factory=dict)  # convert_checkpoint keywords; empty: the teacher itself

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.name, self.options], sort_keys=True).encode()).hexdigest()[:12]


def conversion_arms() -> list[Arm]:
    """Issue 11, 5a, in the order they are run (the cheapest informative arms first)."""
    arms = [Arm("original", "reference")]
    arms.append(Arm("avg-r64", "conversion", {"loops": 2, "init": "average", "lora_rank": 64}))
    arms.append(Arm("avg-r64-calib", "conversion", {"loops": 2, "init": "average", "lora_rank": 64, "calibration": CALIBRATION}))
    arms.append(Arm("avg-r64-calib-seq", "conversion", {"loops": 2, "init": "average", "lora_rank": 64, "calibration": SEQUENTIAL}))
    arms.append(Arm("avg-r64-calib-recon", "conversion", {"loops": 2, "init": "average", "lora_rank": 64, "calibration": RECONSTRUCTION}))
    arms.append(Arm("avg-r64-calib-seq-recon", "conversion", {"loops": 2, "init": "average", "lora_rank": 64, "calibration": SEQ_RECONSTRUCTION}))
    arms.append(Arm("avg-r128", "conversion", {"loops": 2, "init": "average", "lora_rank": 128}))
    arms.append(Arm("avg-r128-calib", "conversion", {"loops": 2, "init": "average", "lora_rank": 128, "calibration": CALIBRATION}))
    for init in ("stepwise", "lower"):
        arms.append(Arm(f"{init}-r64", "conversion", {"loops": 2, "init": init, "lora_rank": 64}))
    for init in ("stepwise", "average", "lower"):
        arms.append(Arm(f"{init if init != 'average' else 'avg'}-r0", "conversion", {"loops": 2, "init": init, "lora_rank": 0}))
    for init in ("stepwise", "lower"):
        arms.append(Arm(f"{init}-r128", "conversion", {"loops": 2, "init": init, "lora_rank": 128}))
    arms.append(Arm("avg-r64-3loops", "conversion", {"loops": 3, "init": "average", "lora_rank": 64}))
    arms.append(Arm("avg-r64-zero", "conversion", {"loops": 2, "init": "average", "lora_rank": 64, "lora_init": "zero"}))
    # Mixture-of-Recursions' middle-cycle: layers 0 and N-1 unique, the middle N-2 looped twice
    arms.append(Arm("mc-avg-r64", "conversion", {"loops": 2, "sharing": "middle_cycle", "init": "average", "lora_rank": 64}))
    arms.append(Arm("avg-r128-calib-seq", "conversion", {"loops": 2, "init": "average", "lora_rank": 128, "calibration": SEQUENTIAL}))
    arms.append(Arm("avg-r128-calib-recon", "conversion", {"loops": 2, "init": "average", "lora_rank": 128, "calibration": RECONSTRUCTION}))
    arms.append(Arm("avg-full", "conversion", {"loops": 2, "init": "average", "lora_rank": "full"}))
    return arms


def heldout_windows(tokenizer, windows: int, cache_dir: str = ".cache/tokens"):
    """The yardstick's tokens: the default held-out split, of which the first `windows` windows are scored."""
    from rrt_ray import data

    tokens = data.tokenize_cached(data.load_texts("default", "heldout", None), tokenizer, cache_dir)
    available = (len(tokens) - 1) // SEQ_LEN
    if windows > available:
        raise ValueError(f"--windows {windows}: the held-out split has {available} windows of {SEQ_LEN} tokens")
    return tokens[: windows * SEQ_LEN + 1]


@torch.no_grad()
def window_perplexity(model_dir: str, tokens) -> float:
    """Perplexity over every SEQ_LEN window of tokens, through the project's own eval loader and perplexity."""
    from transformers import AutoModelForCausalLM

    from rrt_ray import data
    from rrt_ray.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return perplexity(model, data.iter_eval_batches(tokens, SEQ_LEN, batch_size=4))


def read_rows(path: Path) -> list[dict]:
    """The rows of the JSON-lines file; a row appended again for the same arm and windows replaces the earlier."""
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.pop((row["key"], row["windows"]), None)
            rows[(row["key"], row["windows"])] = row
    return list(rows.values())


def run_arm(arm: Arm, teacher: str, windows: torch.Tensor, workdir: Path) -> dict:
    """Convert (unless the reference), evaluate, delete the converted weights; one table row."""
    import psutil

    from rrt_ray.convert import convert_checkpoint

    started = time.perf_counter()
    row = {"arm": arm.name, "group": arm.group, "key": arm.key, "options": arm.options}
    if arm.options:
        out = workdir / arm.name
        report = convert_checkpoint(teacher, str(out), overwrite=True, progress=False, **arm.options)
        row.update(params=report.params["total"], original_params=report.original_params, lora_ranks=report.lora_ranks)
        model_dir = str(out)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            row["params"] = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(teacher)).num_parameters()
        model_dir, out = teacher, None
    row["convert_s"] = round(time.perf_counter() - started, 1)
    evaluated = time.perf_counter()
    row["ppl"] = window_perplexity(model_dir, windows)
    row["eval_s"] = round(time.perf_counter() - evaluated, 1)
    row["windows"] = (len(windows) - 1) // SEQ_LEN
    row["peak_rss_gb"] = round(psutil.Process().memory_info().rss / 2**30, 2)  # of the whole study process so far
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    return row


COMPARISONS = (  # (what, baseline arm, arm): a finding is written only when both rows exist
    ("activation-aware SVD + weighted init (a), rank 64", "avg-r64", "avg-r64-calib"),
    ("(a) on the recursive model's own inputs, drift-corrected, rank 64", "avg-r64-calib", "avg-r64-calib-seq"),
    ("(a) on the recursive model's own inputs, drift-corrected, rank 128", "avg-r128-calib", "avg-r128-calib-seq"),
    ("layer-wise reconstruction on top of (a), rank 64", "avg-r64-calib", "avg-r64-calib-recon"),
    ("sequential layer-wise reconstruction on top of drift-corrected (a), rank 64", "avg-r64-calib-seq", "avg-r64-calib-seq-recon"),
    ("activation-aware SVD + weighted init (a), rank 128", "avg-r128", "avg-r128-calib"),
    ("layer-wise reconstruction on top of (a), rank 128", "avg-r128-calib", "avg-r128-calib-recon"),
    ("rank 64 -> 128 (plain SVD, average)", "avg-r64", "avg-r128"),
    ("average -> stepwise init, rank 64", "avg-r64", "stepwise-r64"),
    ("SVD -> zero LoRA init, rank 64", "avg-r64", "avg-r64-zero"),
    ("2 -> 3 loops, rank 64", "avg-r64", "avg-r64-3loops"),
    ("cycle -> middle_cycle sharing (first and last layer unique), rank 64", "avg-r64", "mc-avg-r64"),
)
TRAINING_COMPARISONS = (  # the same uptraining budget on both sides; the pairs of PAPER_CLAIMS are not repeated here
    ("calibrated start (drift-corrected (a)) vs plain SVD, rank 64", "up-avg-r64", "up-avg-r64-calib"),
)
# (what the paper reports, the arm it expects to have the lower perplexity, the other arm): checked on the rows
PAPER_CLAIMS = (
    ("relaxed recursive models (per-depth LoRA) beat plain recursive ones after the same uptraining", "up-avg-r64", "up-stepwise-r0"),
    ("a recursive model beats a truncated model of the same size and training", "up-stepwise-r0", "up-truncated"),
    ("distilling from the original beats plain next-token uptraining", "up-avg-r64-calib", "up-avg-r64-calib-nokd"),
    ("middle-cycle sharing (Mixture-of-Recursions) beats plain cycle sharing after uptraining", "up-mc-avg-r64", "up-avg-r64"),
    ("a higher LoRA rank starts closer to the original (conversion only)", "avg-r128", "avg-r64"),
    ("stepwise init suits plain recursive models best (here before any uptraining)", "stepwise-r0", "avg-r0"),
    ("average init suits SVD-initialised relaxed models best (here before any uptraining)", "avg-r64", "stepwise-r64"),
)
# 5e: `python jobs/tune.py --config jobs/configs/tune_smollm2.yaml`'s results.csv, copied beside the study's table
TUNE_CSV = "tune_smollm2.csv"
TUNE_COLUMNS = ("trial", "lora_rank", "model.calibrate", "params_pct", "heldout_ppl", "tokens_seen", "wall_s", "status", "note")


def findings(rows: list[dict], comparisons=COMPARISONS) -> list[str]:
    by_arm = {r["arm"]: r for r in rows}
    lines = []
    for what, base, arm in comparisons:
        if base in by_arm and arm in by_arm:
            a, b = by_arm[base]["ppl"], by_arm[arm]["ppl"]
            lines.append(f"- {what}: held-out ppl {a:.4g} -> {b:.4g} ({a / b:.3g}x {'lower' if b < a else 'higher'}).")
    return lines


def paper_checks(rows: list[dict]) -> list[str]:
    """One line per claim of the paper whose two arms have rows: the numbers and whether it holds here."""
    by_arm = {r["arm"]: r for r in rows}
    lines = []
    for claim, better, worse in PAPER_CLAIMS:
        if better in by_arm and worse in by_arm:
            a, b = by_arm[better]["ppl"], by_arm[worse]["ppl"]
            verdict = "**holds**" if a < b else "**does not hold**"
            lines.append(f"- The paper: {claim}. Here: {better} {a:.4g} vs {worse} {b:.4g}: {verdict}.")
    return lines


def exit_summary(exits: list[dict]) -> list[str]:
    """The early-exit rows in words: for each threshold, the share leaving after loop 1 and the perplexity cost."""
    lines = []
    for r in exits:
        full = next(e["ppl"] for e in r["exits"] if e["threshold"] is None)
        for e in r["exits"]:
            if e["threshold"]:
                lines.append(f"- Early exit ({r['arm']}), threshold {e['threshold']}: {e['exit1_share']:.1%} of tokens leave after loop 1, "
                             f"held-out ppl {full:.4g} -> {e['ppl']:.4g} ({e['ppl'] / full - 1:+.1%}).")
    return lines


def _cell(text: str) -> str:
    """A csv field as the sweep's own table prints it (tune/results.py)."""
    from rrt_ray.tune.results import format_cell

    for kind in (int, float):
        try:
            return format_cell(kind(text))
        except ValueError:
            pass
    return text


def tune_section(csv_path: Path) -> list[str]:
    """5e, if the sweep has run: its trials (on the sweep's own held-out set, not the study's windows) and the best."""
    import csv

    if not csv_path.is_file():
        return []
    trials = list(csv.DictReader(csv_path.open()))
    lines = ["", "## 5e: Ray Tune sweep over LoRA rank and calibration (`jobs/configs/tune_smollm2.yaml`)", "",
             f"`python jobs/tune.py --config jobs/configs/tune_smollm2.yaml` (results/tune_smollm2.md). Held-out ppl is the sweep's own",
             "held-out set (the trainer's evaluation), so it is comparable between trials, not with the windows above.", "",
             "| " + " | ".join(TUNE_COLUMNS) + " |", "|" + "---|" * len(TUNE_COLUMNS)]
    lines += ["| " + " | ".join(_cell(t.get(c, "")) for c in TUNE_COLUMNS) + " |" for t in trials]
    finished = [t for t in trials if t["status"] == "finished"]
    if finished:
        best = min(finished, key=lambda t: float(t["heldout_ppl"]))
        lines += ["", f"Best finished trial: {best['trial']} (rank {best['lora_rank']}, calibrate {best['model.calibrate']}), held-out ppl {float(best['heldout_ppl']):.4g}."]
    return lines


def write_report(rows: list[dict], md_path: Path, plot_path: Path, command: str, machine: str) -> None:
    """The study's markdown (conversion, uptraining and early-exit tables, findings, what is missing) and plots."""
    from rrt_ray import quality_uptrain

    converted = [r for r in rows if r["group"] in ("reference", "conversion")]
    trained = [r for r in rows if r["group"] == "uptrain"]
    exits = [r for r in rows if r["group"] == "early exit"]
    teacher = next((r for r in rows if r["arm"] == "original"), None)
    share = lambda r: f"{r['params'] / teacher['params']:.1%}" if teacher else ""  # noqa: E731
    lines = [
        "# Quality study on SmolLM2-135M-Instruct (issue 11, item 5)", "",
        f"Command: `{command}`", f"Machine: {machine}", "",
        "Held-out perplexity on the first W 256-token windows of the default corpus's held-out split (W in the table);",
        "calibration draws its sequences from the training split only. Rows come from `quality_smollm2.jsonl`.", "",
        "## 5a: conversions, before any training", "",
        "| arm | options | params | of original | held-out ppl | convert s | eval s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in converted:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "the teacher itself"
        lines.append(f"| {r['arm']} | {options} | {r['params']:,} | {share(r)} | {r['ppl']:.4g} | {r['convert_s']} | {r['eval_s']} |")
    if trained:
        lines += ["", "## 5b: the same uptraining budget for each arm", "",
                  f"Each arm: `jobs/uptrain.py --config {quality_uptrain.CONFIG}` with {', '.join(quality_uptrain.TRAIN_OVERRIDES)}",
                  f"(2 workers, ZeRO-2, fp32, {quality_uptrain.TOKENS_PER_STEP:,} tokens a step). tokens/s is the job's steady rate; peak RSS",
                  "is the largest worker's VmHWM over the run, with the settings of the day each arm ran: item 7's savings came later",
                  "(results/bench_train_memory.md measures the current default and the low-memory settings).", "",
                  f"acc: `rrt eval`'s lm-eval next-line task, {quality_uptrain.EVAL_DOCS} documents, 4 choices (chance 25%)"
                  + (f"; the original scores {teacher['acc']:.1%}." if teacher and "acc" in teacher else "."), "",
                  "| arm | student | params | of original | ppl before | ppl after | acc | tokens | tokens/s | peak RSS/worker | job s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in trained:
            student = ", ".join(f"{k}={v}" for k, v in r["options"]["student"].items()) + "".join(f"; {o}" for o in r["options"]["train"])
            rss = f"{r['peak_rss_mb'] / 1024:.2f} GiB" if r.get("peak_rss_mb") else "-"
            lines.append(f"| {r['arm']} | {student} | {r['params']:,} | {share(r)} | {r['start_ppl']:.4g} | **{r['ppl']:.4g}** | {r['acc']:.1%} | {r['tokens']:,} | "
                         f"{r['tokens_per_s']:.0f} | {rss} | {r['train_s']:.0f} |")
    for r in exits:
        lines += ["", f"## 5c: early-exit post-training of {r['options']['after']} ({r['tokens']:,} tokens, backbone frozen)", "",
                  f"Exit after loop 1 when its top probability reaches the threshold (teacher-forced, the confidence rule); full depth: ppl {r['ppl']:.4g}.", "",
                  "| threshold | tokens leaving after loop 1 | held-out ppl |", "|---:|---:|---:|"]
        for e in r["exits"]:
            label = "never (full depth)" if e["threshold"] is None else "always (loop 1 only)" if e["threshold"] == 0 else f"{e['threshold']}"
            lines.append(f"| {label} | {e['exit1_share']:.1%} | {e['ppl']:.4g} |")
    sweep = tune_section(md_path.parent / TUNE_CSV)
    lines += sweep
    lines += ["", "## Findings (computed from the rows above)", "", *findings(converted), *findings(trained, TRAINING_COMPARISONS)]
    lines += ["", "## Which of the paper's findings hold here (computed from the rows above)", "", *paper_checks(rows), *exit_summary(exits)]
    done = {r["arm"] for r in rows}
    missing = [f"- arm {a.name}: no row yet" for a in conversion_arms() + quality_uptrain.uptrain_arms() if a.name not in done]
    missing += [] if exits else ["- 5c early-exit post-training: no row yet"]
    missing += [] if sweep else [f"- 5e tune sweep on SmolLM2: no {TUNE_CSV} yet (`python jobs/tune.py --config jobs/configs/tune_smollm2.yaml`)"]
    lines += ["", "## Missing", "", *(missing or ["- nothing: every arm of 5a-5e has its row"])]
    lines += ["", f"Complete the table (resumes, skips finished arms): `{command.split(' --arms')[0]}`"]
    md_path.write_text("\n".join(lines) + "\n")
    _plot(converted, trained, plot_path)


def _plot(converted: list[dict], trained: list[dict], plot_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if trained else 1, figsize=(15 if trained else 9, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.bar([r["arm"] for r in converted], [r["ppl"] for r in converted], color=["gray" if r["group"] == "reference" else "tab:blue" for r in converted])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M: conversions before uptraining")
    ax.tick_params(axis="x", rotation=60)
    if trained:
        ax = axes[0][1]
        for r in trained:  # the job's own held-out evaluations: 16 windows of 128 tokens, not the table's yardstick
            curve = sorted(dict(map(tuple, r["curve"])).items())  # rows written before run_job kept one point per step
            ax.plot([0] + [t for t, _ in curve], [r["start_ppl"]] + [p for _, p in curve], marker="o", label=r["arm"])
        ax.set_yscale("log")
        ax.set_xlabel("uptraining tokens")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_title("recovery: start = the yardstick; later points = the job's own held-out eval")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)
