"""The quality study's training arms (issue 11, 5b and 5c): the same uptraining budget for each student, then
early-exit post-training of the best, each through the real job (`python jobs/uptrain.py`, 2 Ray Train workers).

A student is a conversion (rrt_ray.quality's options, cached by its options under <workdir>/students) or the
truncated baseline: the teacher's first N / loops layers, the paper's "same size, no sharing" comparison
(trained as a 1-loop recursive model of those layers, which is exactly that model). Every arm trains for UPTRAIN_STEPS steps of the same batches (seeded),
then is scored on the study's yardstick (rrt_ray.quality.window_perplexity). The job's own held-out
evaluations, every EVAL_EVERY steps, give the recovery curve (perplexity against tokens seen).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rrt_ray import lm_eval_task, quality
from rrt_ray.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
UPTRAIN_STEPS = 12  # 24,576 tokens an arm: ~10 min of a 2-core machine at ~50 tokens/s
EVAL_EVERY = 4
EXIT_STEPS = 8
# on CONFIG's shape (2 workers x 8 x 128 tokens a step), the learning rate and KD weight
TRAIN_OVERRIDES = (
    f"optim.max_steps={UPTRAIN_STEPS}", "optim.warmup_steps=2", "optim.lr=3e-4", "kd.weight=0.9",
    "data.eval_batches=1", f"run.eval_every={EVAL_EVERY}", "run.log_every=2", "run.checkpoint_every=0", "model.calibrate=0",
)  # fmt: skip
EXIT_OVERRIDES = (f"optim.max_steps={EXIT_STEPS}", "optim.warmup_steps=2", f"run.eval_every={EXIT_STEPS}")
THRESHOLDS = (0.9, 0.8, 0.6, 0.4)  # exit after loop 1 when its top probability reaches this (the confidence rule)
CONFIG = "jobs/configs/demo.yaml"  # the shape of every arm's job
TOKENS_PER_STEP = TrainConfig.load(REPO / CONFIG).tokens_per_step
EVAL_DOCS = 100  # lm-eval's 4-way next-line task (chance 25%): ~3 min a model on 2 cores (`rrt eval` defaults to 200)


@dataclass(frozen=True)
class TrainArm:
    name: str
    student: dict  # quality.Arm options of the conversion, or {"truncate": True}
    overrides: tuple[str, ...] = ()  # added to TRAIN_OVERRIDES
    group: str = "uptrain"  # or "early exit": post-training of another arm's result
    after: str = ""  # early exit: the uptrained arm whose model it starts from

    @property
    def key(self) -> str:
        spec = [self.name, self.student, list(self.overrides), self.after, UPTRAIN_STEPS, EXIT_STEPS]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


R64 = {"loops": 2, "init": "average", "lora_rank": 64}
# stands for early_exit_arm(best) until the uptraining rows say which arm is best
EARLY_EXIT_PLACEHOLDER = TrainArm("ee-best", {}, group="early exit")


def uptrain_arms() -> list[TrainArm]:
    """5b, the most informative first: calibrated rank 64 with and without distillation, plain recursive vs the
    truncated model of its size, plain-SVD rank 64, middle cycle."""
    return [
        TrainArm("up-avg-r64-calib", {**R64, "calibration": quality.SEQUENTIAL}),
        TrainArm("up-avg-r64-calib-nokd", {**R64, "calibration": quality.SEQUENTIAL}, ("kd.weight=0",)),
        TrainArm("up-stepwise-r0", {"loops": 2, "init": "stepwise", "lora_rank": 0}),
        TrainArm("up-truncated", {"truncate": True}),
        TrainArm("up-avg-r64", R64),
        TrainArm("up-mc-avg-r64", {**R64, "sharing": "middle_cycle"}),
    ]


def early_exit_arm(best: str) -> TrainArm:
    """5c: the best uptrained arm, post-trained with an exit after every loop (jobs/configs/demo_early_exit.yaml)."""
    student = next(a.student for a in uptrain_arms() if a.name == best)
    return TrainArm(f"ee-{best}", student, group="early exit", after=best)


def truncated_student(teacher: str, out: Path, loops: int = 2) -> int:
    """The teacher's first N // loops decoder layers saved as a plain model of its family; returns the layer count."""
    from transformers import AutoModelForCausalLM

    from rrt_ray.models.arch import layers_path

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    keep = model.config.num_hidden_layers // loops
    parent_path, _, name = layers_path(model.config.model_type).rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, name, torch.nn.ModuleList(list(getattr(parent, name))[:keep]))
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:keep]
    model.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return keep


def student_dir(arm: TrainArm, teacher: str, workdir: Path) -> Path:
    """The arm's starting model, built once per set of options (conversions are deterministic)."""
    from rrt_ray.convert import convert_checkpoint

    key = hashlib.sha256(json.dumps(arm.student, sort_keys=True).encode()).hexdigest()[:12]
    out = workdir / "students" / key
    if (out / "config.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if arm.student.get("truncate"):  # as a 1-loop recursive model of its own layers (exact): what jobs/uptrain.py takes
        truncated_student(teacher, tmp.with_name(tmp.name + "-plain"))
        convert_checkpoint(str(tmp.with_name(tmp.name + "-plain")), str(tmp), loops=1, lora_rank=0, overwrite=True, progress=False)
        shutil.rmtree(tmp.with_name(tmp.name + "-plain"))
    else:
        convert_checkpoint(teacher, str(tmp), overwrite=True, progress=False, **arm.student)
    tmp.rename(out)
    return out


def run_job(name: str, config: str, overrides: list[str], log_path: Path) -> tuple[dict, list[tuple[int, float]], float]:
    """`python jobs/uptrain.py --config config overrides`; (its summary, [(tokens seen, held-out ppl)], wall s).
    A log that already ends in the job's summary (a study stopped while scoring) is read instead of training again."""
    started = time.perf_counter()
    command = [sys.executable, "jobs/uptrain.py", "--config", config, *overrides]
    finished = log_path.is_file() and "uptrain: done " in log_path.read_text() and f"--config {config} {' '.join(overrides)}" in log_path.read_text()
    if not finished:
        with open(log_path, "w") as log:
            log.write(f"command: {' '.join(command[1:])}\n")
            log.flush()
            done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: jobs/uptrain.py exited {done.returncode}; its log: {log_path}\n{log_path.read_text()[-2000:]}")
    text = log_path.read_text()
    summary = json.loads(text.rsplit("uptrain: done ", 1)[1].splitlines()[0])
    summary["wall_s"] = float(re.search(r"^wall_s: ([\d.]+)$", text, re.M).group(1)) if finished else round(time.perf_counter() - started, 1)
    if not finished:
        with open(log_path, "a") as log:
            log.write(f"wall_s: {summary['wall_s']}\n")
    # Ray's log forwarding can print a worker's line twice: one point per step
    curve = sorted({int(step) * TOKENS_PER_STEP: float(ppl) for step, ppl in re.findall(r": step (\d+)/\d+ .*?\(ppl ([\d.]+)\)", text)}.items())
    return summary, curve, summary["wall_s"]


def run_train_arm(arm: TrainArm, teacher: str, windows: torch.Tensor, workdir: Path, rows: list[dict]) -> dict:
    """Build (or reuse) the student, run the job, score the exported model; one table row."""
    from rrt_ray.model_source import resolve_model

    workdir = workdir.resolve()
    runs = workdir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    row = {"arm": arm.name, "group": arm.group, "key": arm.key, "options": {"student": arm.student, "train": list(arm.overrides)}}
    built = time.perf_counter()
    if arm.group == "early exit":
        previous = next(r for r in rows if r["arm"] == arm.after and r["group"] == "uptrain")
        student, config, overrides = previous["model"], "jobs/configs/demo_early_exit.yaml", [*TRAIN_OVERRIDES, *EXIT_OVERRIDES]
        row["options"]["after"] = arm.after
    else:
        student, config, overrides = str(student_dir(arm, teacher, workdir)), CONFIG, list(TRAIN_OVERRIDES)
    row["build_s"] = round(time.perf_counter() - built, 1)
    row["start_ppl"] = start_ppl(arm, student, windows, rows)
    overrides += [*arm.overrides, f"model.teacher={teacher}", f"model.student={student}", f"run.name={arm.name}-{arm.key}",
                  f"run.storage={runs}", f"run.output={workdir / 'models' / arm.name}", f"run.workdir={workdir / 'work' / arm.name}"]
    summary, curve, row["train_s"] = run_job(arm.name, config, overrides, workdir / f"{arm.name}.log")
    model = resolve_model(str(workdir / "models" / arm.name)).path
    row.update(model=str(model), steps=summary["step"], tokens=summary["step"] * TOKENS_PER_STEP, curve=curve,
               tokens_per_s=summary.get("tokens_per_s_mean") or summary.get("tokens_per_s"), peak_rss_mb=summary.get("peak_rss_mb"))
    with torch.device("meta"):
        from transformers import AutoConfig, AutoModelForCausalLM

        row["params"] = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).num_parameters()
    evaluated = time.perf_counter()
    row["ppl"] = quality.window_perplexity(str(model), windows)
    if arm.group == "early exit":  # the same weights at full depth as far as accuracy goes: its exit mix instead
        row["exits"] = exit_mix(str(model), windows)
    else:
        row["acc"] = lm_eval_task.evaluate(str(model), num_docs=EVAL_DOCS)["acc"]
    row["eval_s"] = round(time.perf_counter() - evaluated, 1)
    row["windows"] = (len(windows) - 1) // quality.SEQ_LEN
    return row


def start_ppl(arm: TrainArm, student: str, windows: torch.Tensor, rows: list[dict]) -> float:
    """The student's yardstick perplexity before this arm's training: the conversion row with the same options
    if the study has one (conversions are deterministic), else measured."""
    count = (len(windows) - 1) // quality.SEQ_LEN
    if arm.group == "early exit":
        return next(r["ppl"] for r in rows if r["arm"] == arm.after and r.get("windows") == count)
    same = [r for r in rows if r["group"] == "conversion" and r["options"] == arm.student and r.get("windows") == count]
    return same[-1]["ppl"] if same else quality.window_perplexity(student, windows)


@torch.no_grad()
def exit_mix(model_dir: str, tokens: torch.Tensor) -> list[dict]:
    """Per threshold: the share of tokens that leave after loop 1 and the perplexity when they do (teacher-forced,
    the confidence rule: top probability of the loop-1 exit >= threshold). A decoding engine adds the exited tokens'
    skipped-layer KV copies (CALM), which teacher forcing does not have."""
    from transformers import AutoModelForCausalLM

    from rrt_ray import data
    from rrt_ray.models.early_exit import loop_exit_logits

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    first, last, targets = [], [], []
    for batch in data.iter_eval_batches(tokens, quality.SEQ_LEN, batch_size=4):
        exits = loop_exit_logits(model, batch["input_ids"])
        first.append(torch.log_softmax(exits[0].float(), -1).flatten(0, 1))
        last.append(torch.log_softmax(exits[-1].float(), -1).flatten(0, 1))
        targets.append(batch["labels"].flatten())
    first, last, targets = torch.cat(first), torch.cat(last), torch.cat(targets)
    picked = lambda logp: logp.gather(1, targets[:, None])[:, 0]  # noqa: E731
    first_nll, last_nll, confidence = -picked(first), -picked(last), first.max(-1).values.exp()
    rows = [{"threshold": None, "exit1_share": 0.0, "ppl": float(last_nll.mean().exp())},
            {"threshold": 0.0, "exit1_share": 1.0, "ppl": float(first_nll.mean().exp())}]
    for threshold in THRESHOLDS:
        leave = confidence >= threshold
        nll = torch.where(leave, first_nll, last_nll)
        rows.append({"threshold": threshold, "exit1_share": float(leave.float().mean()), "ppl": float(nll.mean().exp())})
    return rows
