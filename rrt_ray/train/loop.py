"""The training loop that runs inside every Ray Train worker (`train_loop_per_worker`).

Notable features:
- The config arrives as a plain dict and is rebuilt here (`TrainConfig.from_dict`); nothing is read
  from module globals of the driver.
- DeepSpeed ZeRO stage 1/2/3 over the gloo group Ray already made; a client `torch.optim.AdamW`
  (no JIT-compiled optimizer op); the LR scheduler is handed to DeepSpeed, which steps and saves it.
- Losses: next-token CE, plus KD from a frozen teacher loaded once per worker (eval mode, no grad).
- Checkpoints: every rank `engine.save_checkpoint(tmp)` and writes its own data-loader state, then
  every rank `ray.train.report(..., checkpoint=...)`; Ray merges the per-rank directories. Once Ray has
  committed the checkpoint, rank 0 moves the run's "latest" marker (`<run.storage>/<run.name>/latest`):
  it never names a checkpoint whose upload did not finish, nor one a restart would not resume from.
- Resume from `ray.train.get_checkpoint()`: engine, optimizer, scheduler, loader position and the
  running data fingerprint (an order-sensitive hash of every batch consumed), so no step is lost or
  repeated and a resumed run can prove it consumed exactly the batches of an uninterrupted one.
- At the end: a consolidated Hugging Face export (gathered under ZeRO-3), checked against the engine's
  logits, published with `rrt_ray.storage.publish_dir` ("latest" only after a complete upload).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from rrt_ray.evaluation import loss_totals, perplexity_of
from rrt_ray.train.config import TrainConfig
from rrt_ray.train.extensions import clear_stale_build_locks
from rrt_ray.models import RecursiveForCausalLM
from rrt_ray.models.early_exit import early_exit_loss, freeze_backbone, loop_exit_hidden, loop_exit_logits
from rrt_ray.train.head_loss import chunked_head_loss, final_hidden, output_head
from rrt_ray.train.losses import IGNORE_INDEX, combined_loss
from rrt_ray.train.memory import release_free_heap, resident_memory, set_mmap_threshold
from rrt_ray.train.progress import EventLog, MetricWindow, log_line
from rrt_ray.train.schedule import lr_multiplier

DS_TAG = "ds"  # one DeepSpeed tag per Ray checkpoint directory
STATE_FILE = "train_state_rank{rank}.json"
FINGERPRINT_MOD = 2**31 - 1


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict, derived from the TrainConfig (the only place it is written)."""
    zero: dict[str, Any] = {"stage": cfg.zero.stage, "overlap_comm": False, "contiguous_gradients": True}
    if cfg.zero.stage < 3:
        zero.update(reduce_bucket_size=cfg.zero.bucket_size, allgather_bucket_size=cfg.zero.bucket_size)
    else:
        zero.update(reduce_bucket_size=cfg.zero.bucket_size, stage3_prefetch_bucket_size=cfg.zero.bucket_size)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.micro_batch_size * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.zero.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # the client torch AdamW
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases or per-depth vectors).

    fused: one in-place kernel over each (flat, ZeRO-partitioned) tensor. torch's default loop allocates two
    temporaries the size of the partition for the update's denominator (366 MiB for SmolLM2's rank-64 student
    on 2 ranks) and takes 10x longer on CPU; the two agree to float rounding."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, fused=True
    )


def next_token_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets), aligned: logits[:, t] predicts targets[:, t]. (B, T, V), (B, T)."""
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V); no KV cache kept in training
    return logits, batch["labels"]


def batch_fingerprint(previous: int, batch: dict[str, torch.Tensor]) -> int:
    """Order-sensitive running hash of the consumed batches (equal iff the same batches in the same order)."""
    crc = zlib.crc32(batch["input_ids"].numpy().tobytes())
    return (previous * 1_000_003 + crc) % FINGERPRINT_MOD


class _Batches:
    """An endless stream of micro-batches from the loader; its state is the loader's state."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._it: Iterator | None = None

    def next(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:  # end of an epoch: the loader reshuffles on the next iter()
            self._it = iter(self.loader)
            return next(self._it)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Held-out perplexity over every worker's batches (a collective: every rank must call it)."""
    totals = loss_totals(model, batches)  # (sum of token losses, token count)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return perplexity_of(totals) if totals[1] > 0 else math.nan


def held_out_batches(tokens: Any, cfg: TrainConfig, rank: int, world_size: int) -> list[dict[str, torch.Tensor]]:
    """The first data.eval_batches full held-out batches of this rank, the same count on every rank
    (under ZeRO-3 each forward is a collective, so ranks must run the same number)."""
    from rrt_ray.data import iter_eval_batches

    batches = []
    for batch in iter_eval_batches(tokens, cfg.data.seq_len, cfg.data.micro_batch_size, rank, world_size):
        if len(batches) == cfg.data.eval_batches or batch["input_ids"].shape[0] < cfg.data.micro_batch_size:
            break
        batches.append(batch)
    count = torch.tensor([len(batches)])
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
    return batches[: int(count.item())]


def _load_causal_lm(path: str, dtype: torch.dtype) -> torch.nn.Module:
    import rrt_ray  # noqa: F401  registers rrt_recursive with the Auto classes
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _local_dir(uri: str, workdir: Path) -> str:
    """A local copy of a model directory given as a local path or s3:// URI."""
    from rrt_ray import storage

    if not storage.is_remote(uri):
        return uri
    local = workdir / ("model-" + format(zlib.crc32(uri.encode()), "08x"))
    if not (local / "config.json").is_file():
        storage.download_dir(uri, str(local))
    return str(local)


@dataclass
class Worker:
    """Everything one worker trains with, built by `setup_worker`."""

    cfg: TrainConfig
    rank: int
    world_size: int
    tokenizer: Any
    engine: Any  # deepspeed.DeepSpeedEngine
    scheduler: Any
    teacher: torch.nn.Module | None
    batches: _Batches
    eval_batches: list[dict[str, torch.Tensor]]
    events: EventLog


@dataclass
class Position:
    """Where the run is: optimizer steps done, the running data fingerprint, the step it resumed from."""

    step: int = 0
    fingerprint: int = 0
    resumed_from: int | None = None


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: config is `{"train": TrainConfig.to_dict()}`; returns the final metrics.

    The recipe: build the worker (models, data, engine), resume from Ray's checkpoint if there is one,
    train to run.stop_at or optim.max_steps (reporting, evaluating and checkpointing on the way), export.
    """
    import ray.train

    from rrt_ray.devices import configure_accelerator

    configure_accelerator()  # from this worker's devices, before deepspeed is imported
    cfg = TrainConfig.from_dict(config["train"])
    context = ray.train.get_context()
    worker = setup_worker(cfg, context.get_world_rank(), context.get_world_size())
    position = resume(worker)
    metrics = train(worker, position)
    worker.events.close()
    if position.step < cfg.optim.max_steps:  # stopped early on purpose (run.stop_at): no export
        return {**metrics, "stopped_at": position.step}
    metrics.update(export(worker.engine, cfg, worker.tokenizer, worker.rank, worker.eval_batches[:1] or [worker.batches.next()]))
    ray.train.report(metrics)
    return metrics


def setup_worker(cfg: TrainConfig, rank: int, world_size: int) -> Worker:
    """Student (and frozen teacher), data, and the DeepSpeed engine of this rank."""
    torch.manual_seed(cfg.run.seed)
    configure_allocator(cfg)
    workdir = Path(cfg.run.workdir).expanduser() / f"worker{rank}"
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer, model, teacher = load_models(cfg, workdir)
    batches, eval_batches = load_data(cfg, tokenizer, rank, world_size)
    engine, scheduler = build_engine(model, cfg, world_size)
    if rank == 0 and cfg.model.loss_chunk_tokens and cfg.zero.stage == 3:
        print(f"{cfg.run.name}: ZeRO-3 partitions the LM head's weight: the loss runs on whole micro-batches (model.loss_chunk_tokens unused)", flush=True)
    if teacher is not None:
        teacher.to(engine.device)
    eval_batches = [_to_device(batch, engine.device) for batch in eval_batches]
    events = EventLog(cfg.run.storage, cfg.run.name, cfg.run.workdir, rank)
    return Worker(cfg, rank, world_size, tokenizer, engine, scheduler, teacher, batches, eval_batches, events)


def load_models(cfg: TrainConfig, workdir: Path) -> tuple[Any, torch.nn.Module, torch.nn.Module | None]:
    """(tokenizer, student in train mode, frozen teacher or None). The student trains in fp32 master
    weights; the teacher runs in the compute precision."""
    from transformers import AutoTokenizer

    student_dir = _local_dir(cfg.model.student, workdir)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = _load_causal_lm(student_dir, torch.float32)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.early_exit.enabled and not isinstance(model, RecursiveForCausalLM):
        raise ValueError(f"early_exit needs a converted recursive student, got a {model.config.model_type} model")
    if cfg.early_exit.freeze_backbone:
        freeze_backbone(model)
    model.train()
    teacher = None
    if cfg.kd.enabled:  # loaded once per worker, frozen, outside the DeepSpeed engine
        dtype = torch.bfloat16 if cfg.zero.precision == "bf16" else torch.float32
        teacher = _load_causal_lm(_local_dir(cfg.model.teacher, workdir), dtype).eval().requires_grad_(False)
        student_vocab = model.config.get_text_config().vocab_size
        if teacher.config.vocab_size != student_vocab:
            raise ValueError(f"teacher vocab {teacher.config.vocab_size} differs from student vocab {student_vocab}: KD needs the same tokenizer")
    return tokenizer, model, teacher


def load_data(cfg: TrainConfig, tokenizer: Any, rank: int, world_size: int) -> tuple[_Batches, list[dict[str, torch.Tensor]]]:
    """This rank's endless training stream and its held-out batches."""
    from rrt_ray.data import ShardedSequenceLoader
    from rrt_ray.train.data_prep import token_arrays

    train_tokens, eval_tokens = token_arrays(cfg.data, tokenizer)
    loader = ShardedSequenceLoader(train_tokens, cfg.data.seq_len, cfg.data.micro_batch_size, rank, world_size, cfg.run.seed)
    return _Batches(loader), held_out_batches(eval_tokens, cfg, rank, world_size)


def build_engine(model: torch.nn.Module, cfg: TrainConfig, world_size: int) -> tuple[Any, Any]:
    """(DeepSpeed engine, LR scheduler): AdamW plus the configured schedule, stepped by DeepSpeed."""
    import deepspeed

    clear_stale_build_locks()  # else a build killed in an earlier run hangs deepspeed.initialize forever
    optimizer = build_optimizer(model, cfg)
    schedule = lr_multiplier(cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.max_steps, cfg.optim.min_lr_ratio, cfg.optim.decay_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size))
    return engine, scheduler


def resume(worker: Worker) -> Position:
    """Engine, optimizer, scheduler and loader state from Ray's latest checkpoint, if there is one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Position()
    with checkpoint.as_directory() as ckpt_dir:
        worker.engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
        state = json.loads((Path(ckpt_dir) / STATE_FILE.format(rank=worker.rank)).read_text())
    worker.batches.load_state_dict(state["loader"])
    return Position(state["step"], state["fingerprint"], state["step"])


def micro_batch_loss(engine: Any, teacher: torch.nn.Module | None, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The loss of one micro-batch and its logged terms, with loss = (1 - kd.weight) * ce_loss + kd.weight * kd_loss
    in both modes: ce_loss is next-token CE, or with early exit the exits' loss (weighted CE over exits plus
    self-distillation) that takes its place; final_ce_loss is then the last exit's CE, for comparison.

    Every term is summed over the batch's tokens and divided once by their count: whole (model.loss_chunk_tokens=0,
    or ZeRO-3), or from the final hidden states a chunk of tokens at a time (train/head_loss.py), the same loss."""
    model = getattr(engine, "module", engine)
    input_ids, targets = batch["input_ids"], batch["labels"].flatten()  # (B, T), (B*T,)
    counted = (targets != IGNORE_INDEX).sum().clamp_min(1)
    if cfg.model.loss_chunk_tokens and cfg.zero.stage < 3:
        exits = loop_exit_hidden(model, input_ids, use_cache=False) if cfg.early_exit.enabled else [final_hidden(model, input_ids)]
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_hidden, teacher_head = final_hidden(teacher, input_ids).flatten(0, 1), output_head(teacher)

            def teacher_logits(part: slice) -> torch.Tensor:
                with torch.no_grad():
                    return teacher_head.logits(teacher_hidden[part])

        objective = _objective(cfg, targets, teacher_logits)
        loss, logged = chunked_head_loss([h.flatten(0, 1) for h in exits], output_head(model), objective, cfg.model.loss_chunk_tokens)
    else:
        exits = loop_exit_logits(model, input_ids) if cfg.early_exit.enabled else [next_token_logits(engine, batch)[0]]
        full_teacher = None
        if teacher is not None:
            with torch.no_grad():
                full_teacher = next_token_logits(teacher, batch)[0].flatten(0, 1)
        objective = _objective(cfg, targets, None if full_teacher is None else lambda part: full_teacher[part])
        loss, logged = objective([e.flatten(0, 1) for e in exits], slice(None))
    names = ("ce_loss", "kd_loss") + (("final_ce_loss",) if cfg.early_exit.enabled else ())
    return {"loss": loss / counted, **{name: value / counted for name, value in zip(names, logged.detach())}}


def _objective(cfg: TrainConfig, targets: torch.Tensor, teacher_logits: Any) -> Any:
    """objective(exit logits [(n, V)], part) -> (loss sum, [ce, kd(, final ce)] sums) over the tokens `part` of the
    flattened batch; teacher_logits(part) gives the teacher's (n, V), or is None without distillation."""

    def objective(exits: list[torch.Tensor], part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        y = targets[part]
        task, extra = None, []
        if cfg.early_exit.enabled:
            ee = cfg.early_exit
            task, ces = early_exit_loss(exits, y, ee.schedule, ee.distill_weight, cfg.kd.temperature, reduction="sum")
            extra = [ces[f"exit{len(exits)}_ce"]]
        teacher = None if teacher_logits is None else teacher_logits(part)
        loss, ce, kd = combined_loss(exits[-1], y, teacher, cfg.kd.weight, cfg.kd.loss, cfg.kd.temperature, task, reduction="sum")
        return loss, torch.stack([ce.detach().float(), kd.detach().float(), *map(ce.new_tensor, extra)])

    return objective


def train(worker: Worker, position: Position) -> dict[str, Any]:
    """Optimizer steps from position.step to the stop step; reports (and evaluates, checkpoints) on the
    configured cadences. Returns the last report's metrics."""
    cfg, engine = worker.cfg, worker.engine
    names = ("loss", "ce_loss", "kd_loss") + (("final_ce_loss",) if cfg.early_exit.enabled else ())
    window = MetricWindow(names)
    stop_at = min(cfg.run.stop_at or cfg.optim.max_steps, cfg.optim.max_steps)
    metrics: dict[str, Any] = {"step": position.step}
    steps_in_window = 0
    while position.step < stop_at:
        for _ in range(cfg.optim.grad_accum):
            batch = worker.batches.next()
            position.fingerprint = batch_fingerprint(position.fingerprint, batch)
            terms = micro_batch_loss(engine, worker.teacher, _to_device(batch, engine.device), cfg)
            trim_heap(cfg)
            engine.backward(terms["loss"])
            trim_heap(cfg)
            engine.step()
            trim_heap(cfg)
            window.add(terms, batch["input_ids"].numel() * worker.world_size)
        position.step += 1
        steps_in_window += 1
        due = _due(cfg, position.step, stop_at, bool(worker.eval_batches))
        if due is not None:
            window_metrics = window.close(steps_in_window)
            metrics = report(worker, position, due, {**window_metrics, "seconds_left": window.seconds_left(stop_at - position.step)}, stop_at)
            steps_in_window = 0
    return metrics


def configure_allocator(cfg: TrainConfig) -> None:
    """run.mmap_threshold_mb, before the models are loaded (train/memory.py)."""
    if cfg.run.mmap_threshold_mb:
        set_mmap_threshold(cfg.run.mmap_threshold_mb * 2**20)


def trim_heap(cfg: TrainConfig) -> None:
    """run.trim_heap: give the heap's free pages back between the phases of a step (train/memory.py)."""
    if cfg.run.trim_heap:
        release_free_heap()


def _due(cfg: TrainConfig, step: int, stop_at: int, can_eval: bool) -> dict[str, bool] | None:
    """Which of report / eval / checkpoint fall on this step (None: none)."""
    last = step == stop_at
    due = {
        "eval": can_eval and (last or bool(cfg.run.eval_every and step % cfg.run.eval_every == 0)),
        "checkpoint": bool(cfg.run.checkpoint_every) and (last or step % cfg.run.checkpoint_every == 0),
    }
    return due if last or any(due.values()) or step % cfg.run.log_every == 0 else None


def report(worker: Worker, position: Position, due: dict[str, bool], window: dict[str, float], stop_at: int) -> dict[str, Any]:
    """Metrics of the window to Ray (with a checkpoint when due) and one log line from rank 0."""
    import ray.train

    cfg = worker.cfg
    metrics: dict[str, Any] = {
        "step": position.step,
        **window,
        "lr": worker.scheduler.get_last_lr()[0],
        "tokens_seen": position.step * cfg.tokens_per_step,
        "data_fingerprint": _all_ranks_sum(position.fingerprint),
        "resumed_from": position.resumed_from,
        "peak_rss_mb": _all_ranks_max(resident_memory()["peak_rss_mb"]),  # the largest worker's, so far
    }
    if due["eval"]:
        metrics["heldout_ppl"] = evaluate(worker.engine, worker.eval_batches)
        metrics["heldout_loss"] = math.log(metrics["heldout_ppl"])
    if worker.rank == 0:
        print(log_line(cfg.run.name, metrics, stop_at), flush=True)
        worker.events.write(metrics)
    if due["checkpoint"]:
        _save_and_report(worker.engine, cfg, metrics, worker.rank, worker.batches.state_dict(), position.fingerprint, position.step)
    else:
        ray.train.report(metrics)
    return metrics


def _to_device(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _all_ranks_sum(value: int) -> int:
    if not dist.is_initialized():
        return value
    total = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())


def _all_ranks_max(value: float) -> float:
    if not dist.is_initialized():
        return value
    peak = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak.item())


def _save_and_report(engine: Any, cfg: TrainConfig, metrics: dict[str, Any], rank: int, loader_state: dict, fingerprint: int, step: int) -> None:
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode

    from rrt_ray import storage

    tmp = Path(tempfile.mkdtemp(prefix=f"rrt-ckpt-{step}-rank{rank}-"))
    try:
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        state = {"step": step, "loader": loader_state, "fingerprint": fingerprint}
        (tmp / STATE_FILE.format(rank=rank)).write_text(json.dumps(state))
        name = f"step_{step:08d}"
        try:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=name)
            if rank == 0:
                # Move the marker only once Ray has committed the checkpoint (every rank's shard uploaded
                # and registered): "latest" never names a checkpoint a restart would not resume from.
                ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
                storage.write_latest(storage.join(cfg.run.storage, cfg.run.name), name)
        except Exception as err:
            lines = str(err).strip().splitlines() or [""]
            raise RuntimeError(
                f"checkpoint upload of step {step} to {storage.join(cfg.run.storage, cfg.run.name, name)} failed "
                f"({type(err).__name__}: {lines[-1]}); \"latest\" was not moved and still names the previous complete checkpoint"
            ) from err
        if dist.is_initialized():
            dist.barrier()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) parameters on every rank; gathers under ZeRO-3. A collective."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        return {name: tensor.detach().clone().float() for name, tensor in module.state_dict().items()}


def export(engine: Any, cfg: TrainConfig, tokenizer: Any, rank: int, probe: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Save a Hugging Face directory of the trained model, check it, publish it. Every rank must call."""
    from rrt_ray import storage

    state_dict = consolidated_state_dict(engine)
    engine.eval()
    with torch.no_grad():
        engine_logits = engine(input_ids=probe[0]["input_ids"]).logits.float()  # (B, T, V)
    metrics: dict[str, Any] = {}
    if rank == 0:
        staging = Path(tempfile.mkdtemp(prefix="rrt-export-"))
        try:
            module = engine.module
            module.config.dtype = "float32"
            module.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            if cfg.run.verify_export:
                reloaded = _load_causal_lm(str(staging), torch.float32).eval()
                with torch.no_grad():
                    reloaded_logits = reloaded(input_ids=probe[0]["input_ids"]).logits.float()
                diff = (reloaded_logits - engine_logits).abs().max().item()
                metrics["export_max_logit_diff"] = diff
                if cfg.zero.precision == "fp32" and diff > 1e-4:
                    raise RuntimeError(f"exported model differs from the trained engine: max |logit diff| {diff:.3g}")
            metrics["export_uri"] = storage.publish_dir(str(staging), cfg.run.output, cfg.run.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return metrics
