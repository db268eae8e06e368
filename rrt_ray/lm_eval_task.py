"""`rrt eval MODEL`: task accuracy with lm-evaluation-harness, in process, on a task built from local text.

No hub is reachable, so the task is made from text every machine has: the default corpus's held-out split
(CPython standard library and Python docs). "rrt_next_line" is a 4-way multiple choice: the context is up to
CONTEXT_LINES consecutive non-blank lines of a held-out document, the choices are the true next line and
three lines drawn (seeded) from other held-out documents; lm-eval's `hf` model scores each choice's
log-likelihood (acc, and acc_norm by byte length). Chance is 25%.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

TASK = "rrt_next_line"
CONTEXT_LINES = 6
CHOICES = 4
_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def next_line_docs(num_docs: int, seed: int = 0) -> list[dict]:
    """The task's documents: {"context", "choices", "label"} from the held-out split, seeded."""
    from rrt_ray import data

    docs_lines = [[line for line in text.splitlines() if line.strip() and len(line) < 200] for text in data.load_texts("default", "heldout")]
    docs_lines = [lines for lines in docs_lines if len(lines) > CONTEXT_LINES + 1]
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        d = rng.randrange(len(docs_lines))
        lines = docs_lines[d]
        start = rng.randrange(len(lines) - CONTEXT_LINES)
        answer = lines[start + CONTEXT_LINES]
        distractors: list[str] = []
        while len(distractors) < CHOICES - 1:
            other = docs_lines[rng.randrange(len(docs_lines))]
            line = other[rng.randrange(len(other))]
            if line.strip() != answer.strip() and line not in distractors:
                distractors.append(line)
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [answer] + distractors[label:]
        context = "\n".join(lines[start : start + CONTEXT_LINES]) + "\n"
        docs.append({"context": context, "choices": choices, "label": label})
    return docs


def write_task(folder: Path, num_docs: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / f"{TASK}.jsonl"
    data_file.write_text("".join(json.dumps(doc) + "\n" for doc in next_line_docs(num_docs, seed)))
    (folder / f"{TASK}.yaml").write_text(_YAML.format(task=TASK, data=data_file))
    return folder


def evaluate(model_dir: str, num_docs: int = 200, batch_size: int = 8, seed: int = 0) -> dict[str, float]:
    """{"acc", "acc_norm", "docs"} of the model at model_dir (any Auto-loadable causal LM, recursive ones too)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rrt_ray  # noqa: F401  (registers the recursive model)

    if num_docs < 1:
        raise ValueError(f"--docs must be >= 1, got {num_docs}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory(prefix="rrt-eval-") as scratch:
        manager = TaskManager(include_path=str(write_task(Path(scratch), num_docs, seed)))
        results = simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu"),
            tasks=[TASK], task_manager=manager, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        )
    metrics = results["results"][TASK]
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "docs": num_docs}


def add_eval_command(sub) -> None:
    """`rrt eval MODEL [--docs N]`: registered by rrt_ray/cli.py."""
    p = sub.add_parser("eval", help="task accuracy (lm-evaluation-harness, local next-line task)", description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL", help="a Hugging Face model directory (original or converted)")
    p.add_argument("--docs", type=int, default=200, help="task documents (default 200)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=lambda args: print(json.dumps(evaluate(args.model, args.docs, args.batch_size))))
