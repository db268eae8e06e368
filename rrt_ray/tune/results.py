"""What a sweep leaves behind, under `<sweep.output>/<sweep.name>/`:

    results.csv, results.md   one row per trial: options, parameters (total, % of the teacher), held-out
                              loss and perplexity, tokens seen, wall time, status, Pareto mark
    results.png               held-out perplexity vs parameters, a series per init, a marker per rank,
                              the Pareto front, the teacher as a reference line
    summary.json              the best trial, the teacher's held-out perplexity, the held-out set
    best/<trial>, best/latest the best trial's model (a Hugging Face directory) behind an atomic marker
    tensorboard/<trial>/      per-trial curves (written live by the runner)
    trials/<trial>/           every finished trial's exported model

Pure functions over plain rows (dicts), so the table, the Pareto marks and the selection are tested
without Ray.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from rrt_ray.tune.space import TrialPlan

# Table columns for the conversion and training options every trial has, by TrainConfig key.
OPTION_COLUMNS = {
    "init": "model.init",
    "loops": "model.loops",
    "sharing": "model.sharing",
    "lora_rank": "model.lora_rank",
    "lora_init": "model.lora_init",
    "kd_weight": "kd.weight",
    "lr": "optim.lr",
}
FINISHED, STOPPED, FAILED, PENDING = "finished", "stopped early", "failed", "not run"


def _get(train: dict[str, Any], dotted: str) -> Any:
    node: Any = train
    for part in dotted.split("."):
        node = node[part]
    return node


def option_columns(plans: list[TrialPlan]) -> list[str]:
    """The standard option columns, then any other swept key (as its dotted name)."""
    extra = [key for plan in plans[:1] for key in plan.options if key not in OPTION_COLUMNS.values()]
    return list(OPTION_COLUMNS) + extra


def trial_row(plan: TrialPlan, metrics: dict[str, Any], error: str | None, budget_tokens: int, diverge_limit: float) -> dict[str, Any]:
    """One table row from a trial's plan and its last reported metrics (or its error)."""
    row: dict[str, Any] = {"trial": plan.name}
    for column in option_columns([plan]):
        row[column] = _get(plan.train, OPTION_COLUMNS.get(column, column))
    loss = float(metrics.get("heldout_loss", float("nan")))
    tokens = int(metrics.get("tokens_seen", 0))
    row.update(
        params=plan.params,
        params_pct=100.0 * plan.params_frac,
        heldout_loss=loss,
        heldout_ppl=math.exp(min(loss, 700.0)) if not math.isnan(loss) else float("nan"),
        tokens_seen=tokens,
        tokens_budget=budget_tokens,
        wall_s=float(metrics.get("time_total_s", 0.0)),
        status="",
        pareto="",
        note="",
        export_uri=metrics.get("export_uri", ""),
    )
    if error:
        row.update(status=FAILED, note=error)
    elif "tokens_seen" not in metrics:  # never reported: queued, or interrupted before its first milestone
        row.update(status=PENDING)
    elif tokens >= budget_tokens and row["export_uri"]:
        row.update(status=FINISHED)
    else:
        train_loss = float(metrics.get("loss", float("nan")))
        diverged = not math.isfinite(train_loss) or not math.isfinite(loss) or train_loss > diverge_limit
        note = f"diverged: loss {train_loss:.3g} > {diverge_limit:.3g}" if diverged else f"ASHA at {tokens:,} tokens"
        row.update(status=STOPPED, note=note)
    return row


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """Mark finished trials that no other finished trial beats on both size and held-out loss."""
    done = [r for r in rows if r["status"] == FINISHED and math.isfinite(r["heldout_loss"])]
    for row in done:
        dominated = any(
            o["params"] <= row["params"] and o["heldout_loss"] <= row["heldout_loss"]
            and (o["params"] < row["params"] or o["heldout_loss"] < row["heldout_loss"])
            for o in done
        )
        row["pareto"] = "" if dominated else "*"


def select_best(rows: list[dict[str, Any]], max_params_frac: float) -> dict[str, Any] | None:
    """The finished trial with the lowest held-out loss among those within the parameter budget."""
    eligible = [
        r for r in rows
        if r["status"] == FINISHED and math.isfinite(r["heldout_loss"]) and r["params_pct"] <= 100.0 * max_params_frac + 1e-9
    ]
    return min(eligible, key=lambda r: (r["heldout_loss"], r["params"])) if eligible else None


def format_cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits, large ints with thousands separators."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    return [c for c in rows[0] if c != "export_uri"] if rows else []


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=table_columns(rows) + ["export_uri"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]]) -> str:
    columns = table_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], teacher_ppl: float | None, teacher_params: int, path: str) -> None:
    """Held-out perplexity vs parameter count: colour per init, marker per rank, Pareto front, teacher line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["status"] in (FINISHED, STOPPED) and math.isfinite(r["heldout_ppl"])]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    inits = sorted({str(r["init"]) for r in shown})
    ranks = sorted({str(r["lora_rank"]) for r in shown}, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    markers = dict(zip(ranks, "osD^vP*Xh<>"))
    colors = dict(zip(inits, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for row in shown:
        finished = row["status"] == FINISHED
        ax.scatter(row["params"], row["heldout_ppl"], marker=markers.get(str(row["lora_rank"]), "o"), s=55,
                   color=colors[str(row["init"])], alpha=1.0 if finished else 0.35, edgecolors="black" if row["pareto"] else "none")
    front = sorted((r for r in shown if r["pareto"]), key=lambda r: r["params"])
    if front:
        ax.step([r["params"] for r in front], [r["heldout_ppl"] for r in front], where="post", color="gray", lw=1, ls="--", label="Pareto front")
    if teacher_ppl is not None:
        ax.axhline(teacher_ppl, color="black", lw=0.8, label=f"teacher ({teacher_params:,} params): {teacher_ppl:.1f}")
    for init in inits:
        ax.scatter([], [], color=colors[init], marker="o", label=f"init {init}")
    for rank in ranks:
        ax.scatter([], [], color="gray", marker=markers[rank], label=f"rank {rank}")
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out perplexity")
    if shown and max(r["heldout_ppl"] for r in shown) / max(1e-9, min(r["heldout_ppl"] for r in shown)) > 20:
        ax.set_yscale("log")
    ax.set_title("Sweep: held-out perplexity vs size (faded: stopped early; outlined: Pareto-optimal)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
