"""Calibrated conversion: start the recursive model close to the original instead of at perplexity 10^6.

The paper's plain SVD minimises ||R - R_r||_F over all inputs. What matters is the error on the inputs a
projection actually sees. With X (n, d_in) the inputs of original layer l's projection on a few calibration
sequences from the training split, and C = X^T X / n = S S^T (Cholesky, damped):

    ||(R - R_r) X^T||_F^2 / n = ||(R - R_r) S||_F^2        so the best rank-r R_r in that norm is
    R_r = [R S]_r S^{-1}                                   (truncate the whitened residual, then unwhiten:
                                                            SVD-LLM's construction; B = U_r S_r, A = V_r^T S^{-1})

Damping C + lam I keeps S well conditioned; the inequality ||(R - R_r) X|| <= ||(R - R_svd) X|| still holds
for any lam >= 0 (R_r minimises f + lam g with f the activation error and g the Frobenius error, which the
plain SVD minimises, so f(R_r) <= f(R_svd) + lam (g(R_svd) - g(R_r)) <= f(R_svd)).

The shared weight is activation-weighted too: W'_k = argmin sum_l ||(W_l - W') X_l^T||^2
= (sum_l W_l C_l)(sum_l C_l)^{-1} over the layers the init strategy picks (for one layer: that layer).

Fitting every position on the ORIGINAL's inputs ignores that the recursive model's own inputs drift from them
position by position. `inputs="recursive_corrected"` (`--calibrate-inputs`) fits the positions in execution
order on the recursive model's own activations X_s (with the earlier positions already refitted, GPTQ's
sequential scheme), against the original layer's output on the original's inputs X_t, so each position also
corrects the drift before it:

    min_{rank r} ||W_l X_t^T - (W' + BA) X_s^T||^2 + lam ||W' + BA - W_l||^2
    = truncate M0 = W_l (H + lam I)(G + lam I)^{-1} - W'  in the (G + lam I) norm,   G = X_s^T X_s / n, H = X_t^T X_s / n

(exact at full rank: there X_s = X_t and M0 = W_l - W'). On SmolLM2-135M, 2 loops, rank 64, it took held-out
perplexity from 1910 (original inputs) to 137 (results/calibration_smollm2.md).

`--reconstruct` then trains each unrolled position's LoRA, per-depth norms and biases (W' frozen) by Adam on
the relative error ||f_l(h) - y||^2 / ||y - h||^2 over all but the last calibration batch, keeping the best
parameters seen on that held-out batch, so a position never ends worse than it started on calibration data it
did not train on (at full rank the start is exact and is kept). Its inputs and targets follow the calibration
inputs, so it refines the refit instead of undoing it:

    recursive_corrected   in the sequential pass, right after position l's refit: h = the recursive model's own
                          hidden state (positions 0..l-1 refitted AND reconstructed), y = the original layer l's
                          output on the original's hidden state; then h is carried through the trained position
    recursive             the same pass, y = the original layer l applied to the recursive h (the refit's own
                          objective, min ||(W_l - W' - BA) X_s||, on the whole layer)
    original              every position on its own: h, y = the original's input and output of layer l
                          (positions independent given those: cheap, but blind to the drift)

On SmolLM2-135M, 2 loops, rank 64 (results/calibration_smollm2.md): the sequential scheme took held-out ppl
136.8 -> 70.1; training position l on the original's hidden states instead undid the drift correction
(136.8 -> 300.0), and judging the kept parameters on the batch they trained on overfitted (136.8 -> 240.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rrt_ray.convert.svd import truncated_svd


# Whose activations fit each unrolled position's LoRA (the shared W' always uses the original's moments):
CALIBRATION_INPUTS = {
    "original": "the original model's layer inputs (one forward of the original; positions independent)",
    "recursive": "the recursive model's own inputs at that position, positions fitted in order (GPTQ's sequential "
    "scheme): min ||(W_l - W' - BA) X_s||",
    "recursive_corrected": "as recursive, but the target is the original layer's output on the original's own "
    "inputs, so each position also absorbs the error of the positions before it: min ||W_l X_t - (W' + BA) X_s||",
}


@dataclass
class CalibrationSpec:
    """How `rrt convert --calibrate N` calibrates. Validated before any weight is read.

    sequences: calibration sequences (0: no calibration, the paper's plain SVD); seq_len: tokens each.
    data: the corpus (as `data.source` in training); always its training split, never the held-out one.
    damping: lam as a fraction of the mean diagonal of C (GPTQ's 1%).
    reconstruct: layer-wise reconstruction after the activation-aware init, on the inputs and towards the
        targets that `inputs` implies (the module docstring: in execution order on the recursive model's own
        hidden states unless inputs="original"); steps and lr of its Adam, and how many calibration batches
        each step sees (batches of batch_size sequences, in turn), and how many it holds out to judge which
        parameters are kept.
    batch_size: calibration sequences per forward pass (memory only); seed: which sequences are drawn.
    """

    sequences: int = 0
    seq_len: int = 256
    data: str = "default"
    damping: float = 0.01
    inputs: str = "recursive_corrected"  # CALIBRATION_INPUTS (measured best: results/calibration_smollm2.md)
    weighted_shared: bool = True  # W' = activation-weighted mean of its layers (False: the init strategy's plain mean)
    reconstruct: bool = False
    # SmolLM2-135M, rank 64: 10 steps at 3e-4 took held-out ppl 136.8 -> 70.1 in ~8 min (results/calibration_smollm2.md)
    reconstruct_steps: int = 10
    reconstruct_lr: float = 3e-4
    reconstruct_batches: int = 1  # calibration batches each reconstruction step sees (time: ~linear in it)
    # calibration batches reconstruction never trains on; the parameters kept are the best on them. Trained and
    # judged on one batch of 8 SmolLM2 sequences, every position's error fell on that batch and rose on the
    # others (overfitting: held-out ppl 136.8 -> 240). 0, or too few batches: judged on the training batches.
    reconstruct_holdout: int = 1
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.sequences >= 0, f"--calibrate must be >= 0 sequences, got {self.sequences}"),
            (self.seq_len >= 2, f"calibration seq_len must be >= 2, got {self.seq_len}"),
            (self.damping >= 0, f"calibration damping must be >= 0, got {self.damping}"),
            (self.reconstruct_steps >= 1, f"reconstruct steps must be >= 1, got {self.reconstruct_steps}"),
            (self.reconstruct_lr > 0, f"reconstruct lr must be > 0, got {self.reconstruct_lr}"),
            (self.batch_size >= 1, f"calibration batch_size must be >= 1, got {self.batch_size}"),
            (self.reconstruct_batches >= 1, f"reconstruct batches must be >= 1, got {self.reconstruct_batches}"),
            (self.reconstruct_holdout >= 0, f"reconstruct holdout must be >= 0 batches, got {self.reconstruct_holdout}"),
            (self.inputs in CALIBRATION_INPUTS, f"unknown calibration inputs {self.inputs!r}; allowed: {', '.join(CALIBRATION_INPUTS)}"),
            (not self.reconstruct or self.sequences > 0, "--reconstruct needs --calibrate N with N > 0 calibration sequences"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def enabled(self) -> bool:
        return self.sequences > 0

    @property
    def sequential(self) -> bool:
        """Positions fitted in order on the recursive model's own inputs (needs the converted model itself)."""
        return self.enabled and self.inputs != "original"


# ---------------------------------------------------------------- the linear algebra


def damped_cholesky(moment: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower-triangular S (d, d) with S S^T = C + damping * mean(diag C) * I, in float64."""
    c = moment.double()
    lam = damping * c.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    for extra in (0.0, 1e-8, 1e-6, 1e-4):  # a singular C with damping 0: the smallest jitter that factors
        s, info = torch.linalg.cholesky_ex(c + (lam + extra * c.diagonal().mean()) * eye)
        if info == 0:
            return s
    raise ValueError("calibration second moment is not positive definite even with damping; use more sequences")


def whitened_truncated_svd(
    residual: torch.Tensor, moment: torch.Tensor, rank: int, *, damping: float = 0.01, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-r approximation of residual (m, n) in the norm ||M S||_F.

    moment: C (n, n), the second moment of the inputs. Shapes: B (m, r), A (r, n), fp32.
    """
    s = damped_cholesky(moment, damping)  # (n, n) lower
    whitened = residual.double() @ s  # (m, n)
    us, vh = truncated_svd(whitened.float(), rank, seed=seed)  # whitened ~= us @ vh
    a = torch.linalg.solve_triangular(s, vh.double(), upper=False, left=False)  # vh S^{-1}: (r, n)
    return us.float(), a.float()


def activation_weighted_mean(weights: list[torch.Tensor], moments: list[torch.Tensor], damping: float = 0.01) -> torch.Tensor:
    """argmin_W sum_i ||(W_i - W) S_i||^2 = (sum_i W_i C_i)(sum_i C_i)^{-1}. weights (m, n), moments (n, n)."""
    if len(weights) == 1:
        return weights[0].clone()
    total = sum(c.double() for c in moments)  # (n, n)
    lam = damping * total.diagonal().mean().clamp_min(1e-12)
    total = total + lam * torch.eye(total.shape[0], dtype=total.dtype)
    rhs = sum(w.double() @ c.double() for w, c in zip(weights, moments)) + lam * sum(w.double() for w in weights) / len(weights)
    return torch.linalg.solve(total, rhs.mT).mT.float()  # C symmetric: W' C = rhs  <=>  C W'^T = rhs^T


def activation_error(residual: torch.Tensor, b: torch.Tensor, a: torch.Tensor, inputs: torch.Tensor) -> float:
    """||(R - B A) X^T||_F for inputs X (n, d_in)."""
    return torch.linalg.matrix_norm((residual.double() - b.double() @ a.double()) @ inputs.double().mT).item()


# ---------------------------------------------------------------- statistics of the original model


def calibration_batches(tokenizer, spec: CalibrationSpec, cache_dir: str = ".cache/tokens") -> torch.Tensor:
    """spec.sequences windows (S, L) drawn (seeded) from the training split of spec.data."""
    from rrt_ray import data

    tokens = data.tokenize_cached(data.load_texts(spec.data, "train", None), tokenizer, cache_dir)
    windows = len(tokens) // spec.seq_len
    if windows < spec.sequences:
        raise ValueError(f"--calibrate {spec.sequences}: the training split of {spec.data!r} has only {windows} windows of {spec.seq_len} tokens")
    rows = np.random.default_rng(spec.seed).choice(windows, size=spec.sequences, replace=False)
    picked = np.stack([tokens[r * spec.seq_len : (r + 1) * spec.seq_len] for r in sorted(rows)]).astype(np.int64)
    return torch.from_numpy(picked)  # (S, L)


class LayerStats:
    """Second moments of every linear projection's input, and (optionally) each layer's input, output and
    call arguments, gathered by hooks on the original model over the calibration batches."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, keep_hidden: bool) -> None:
        self.moments: dict[tuple[int, str], torch.Tensor] = {}  # (layer, projection rel name) -> C (d_in, d_in)
        self.counts: dict[tuple[int, str], int] = {}
        self.hidden_in: dict[int, list[torch.Tensor]] = {}  # layer -> [(b, L, d)] per batch
        self.hidden_out: dict[int, list[torch.Tensor]] = {}
        self.call_kwargs: dict[int, list[dict]] = {}
        self._handles = []
        # Projections that read one tensor (q/k/v, gate/up) share one moment: input tensor -> its key. Held
        # (not just its id) and cleared when the next layer starts, so an id is never reused within it.
        self._alias: dict[int, tuple[torch.Tensor, tuple[int, str]]] = {}
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(lambda *_: self._alias.clear()))
            for rel, module in layer.named_modules():
                if isinstance(module, nn.Linear):
                    self._handles.append(module.register_forward_hook(self._linear_hook(index, rel)))
            if keep_hidden:
                self._handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(index), with_kwargs=True))
                self._handles.append(layer.register_forward_hook(self._layer_hook(index)))

    def _linear_hook(self, layer: int, rel: str):
        def hook(module, args, output) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (n, d_in)
            key = (layer, rel)
            self.counts[key] = self.counts.get(key, 0) + x.shape[0]
            held = self._alias.get(id(args[0]))
            if held is not None and held[0] is args[0]:  # q/k/v (gate/up) read one tensor: one moment
                self.moments.setdefault(key, self.moments[held[1]])
                return
            self._alias[id(args[0])] = (args[0], key)
            gram = x.mT @ x  # (d_in, d_in)
            if key in self.moments:
                self.moments[key].add_(gram)  # in place: aliases see it
            else:
                self.moments[key] = gram

        return hook

    def _layer_pre_hook(self, layer: int):
        def hook(module, args, kwargs) -> None:
            self.hidden_in.setdefault(layer, []).append(args[0].detach())
            kept = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            self.call_kwargs.setdefault(layer, []).append(kept)

        return hook

    def _layer_hook(self, layer: int):
        def hook(module, args, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            self.hidden_out.setdefault(layer, []).append(out.detach())

        return hook

    def finish(self) -> None:
        for handle in self._handles:
            handle.remove()
        # aliased moments were summed once per batch through their owner; normalise every key once
        done = set()
        for key, moment in self.moments.items():
            if id(moment) not in done:
                moment /= max(self.counts[key], 1)
                done.add(id(moment))
        self._alias.clear()

    def moment(self, layer: int, rel: str) -> torch.Tensor:
        return self.moments[(layer, rel)]


@torch.no_grad()
def collect_stats(model: nn.Module, layers: nn.ModuleList, batches: torch.Tensor, batch_size: int, keep_hidden: bool) -> LayerStats:
    """Run the original model (eval, fp32) over batches (S, L) with the statistics hooks attached."""
    stats = LayerStats(model, layers, keep_hidden)
    try:
        for start in range(0, len(batches), batch_size):
            model(input_ids=batches[start : start + batch_size], use_cache=False)
    finally:
        stats.finish()
    return stats


# ---------------------------------------------------------------- layer-wise reconstruction


def _position_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The per-depth parameters of a shared layer (LoRA, per-depth biases, PerDepth norms); W' excluded."""
    from rrt_ray.models.lora import RelaxedLoRALinear
    from rrt_ray.models.per_depth import PerDepth

    params = []
    for module in layer.modules():
        if isinstance(module, RelaxedLoRALinear):
            params += [p for p in (module.lora_a, module.lora_b) if p is not None]
            if module.bias is not None and module.bias.dim() == 2:
                params.append(module.bias)
        elif isinstance(module, PerDepth):
            params += [getattr(module, name) for name in module.param_names]
    return params


def _position_loss(call, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict]) -> torch.Tensor:
    """Mean over batches of ||f(h) - y||^2 / ||y - h||^2: the error relative to what the layer adds."""
    total = 0.0
    for h, y, kw in zip(inputs, targets, kwargs):
        out = call(h, **kw)
        total = total + F.mse_loss(out, y, reduction="sum") / (y - h).pow(2).sum().clamp_min(1e-12)
    return total / len(inputs)


def _split_batches(count: int, spec: CalibrationSpec) -> tuple[list[int], list[int]]:
    """(training batches, validation batches) of `count` calibration batches: the last spec.reconstruct_holdout
    are never trained on and judge which parameters are kept (with too few batches: the training ones)."""
    holdout = spec.reconstruct_holdout if count > spec.reconstruct_holdout else 0
    train = list(range(count - holdout))
    return train, (list(range(count - holdout, count)) if holdout else train)


def _train_position(call, layer: nn.Module, depth: int, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                    kwargs: list[dict], spec: CalibrationSpec) -> tuple[float, float]:
    """Adam on one unrolled position's per-depth parameters (W' and every other depth frozen) so that
    call(inputs) reproduces targets, (b, L, d) per calibration batch. Each step sees spec.reconstruct_batches
    training batches in turn; the parameters kept are the best seen on the validation batches, so the position
    never ends worse than it started on them. Returns the validation relative error (before, after)."""
    train, val = _split_batches(len(inputs), spec)

    def loss_on(batches: list[int]) -> torch.Tensor:
        return _position_loss(call, [inputs[b] for b in batches], [targets[b] for b in batches], [kwargs[b] for b in batches])

    params = _position_parameters(layer)
    slices = [p.detach()[depth].clone() for p in params]
    with torch.no_grad():
        before = best = loss_on(val).item()
    if best <= 1e-10:  # an exact start (full rank) is kept as it is
        return before, best
    # Only this depth's slice may move (the other depths belong to other positions). Their gradient is zero and
    # Adam leaves such entries alone, but the mask keeps that true for any optimizer (weight decay would not).
    masks = []
    for p in params:
        mask = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)))
        mask[depth] = 1
        masks.append(mask)
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=spec.reconstruct_lr)
    used = min(spec.reconstruct_batches, len(train))
    for step in range(spec.reconstruct_steps):
        with torch.enable_grad():  # the sequential pass runs under no_grad
            optimizer.zero_grad(set_to_none=True)
            loss_on([train[(step * used + i) % len(train)] for i in range(used)]).backward()
        for p, mask in zip(params, masks):
            p.grad.mul_(mask)
        optimizer.step()
        with torch.no_grad():
            current = loss_on(val).item()
        if current < best:
            best, slices = current, [p.detach()[depth].clone() for p in params]
    with torch.no_grad():
        for p, kept in zip(params, slices):
            p.requires_grad_(False)
            p.data[depth] = kept
    return before, best


def _freeze(student: nn.Module) -> None:
    """Eval mode (no dropout) and no gradients anywhere: reconstruction trains one position's slice at a time."""
    student.train(False)
    for p in student.parameters():  # _train_position unfreezes one position's parameters at a time
        p.requires_grad_(False)


def reconstruct(student: nn.Module, stats: LayerStats, spec: CalibrationSpec, log=None) -> dict[int, tuple[float, float]]:
    """The independent scheme (inputs="original"): train each unrolled position on its own to reproduce its
    original layer on the original's hidden states; return {position: (relative error before, after)}."""
    unrolled = student.unrolled_layers
    _freeze(student)
    result = {}
    for position in unrolled.positions:
        index = position.position
        result[index] = _train_position(unrolled[index], unrolled.shared[position.shared], position.depth, stats.hidden_in[index],
                                        stats.hidden_out[index], stats.call_kwargs[index], spec)
        if log is not None:
            log(f"reconstruct position {index}: relative error {result[index][0]:.3e} -> {result[index][1]:.3e}")
    return result


# ---------------------------------------------------------------- sequential calibration (the recursive model's own inputs)


def _input_groups(stats: LayerStats, layer: int) -> list[list[str]]:
    """The projections of one original layer grouped by the tensor they read, in forward order
    ([[q, k, v], [o], [gate, up], [down]] for Llama): a group's input depends only on groups before it."""
    groups: dict[int, list[str]] = {}
    for (index, rel), moment in stats.moments.items():  # insertion order == hook order == forward order
        if index == layer:
            groups.setdefault(id(moment), []).append(rel)
    return list(groups.values())


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _run_capturing(call, modules: list[nn.Module], inputs: list[torch.Tensor], kwargs: list[dict]) -> list[list[torch.Tensor]]:
    """Run call over the batches and return, for each of `modules`, what it read in each batch, (n, d_in)."""
    sinks: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = [
        module.register_forward_hook(lambda mod, args, output, sink=sink: sink.append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for module, sink in zip(modules, sinks)
    ]
    try:
        for h, kw in zip(inputs, kwargs):
            call(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return sinks


def corrected_residual(original: torch.Tensor, shared: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, damping: float) -> torch.Tensor:
    """M0 = argmin_M ||W_l X_t - (W' + M) X_s||^2 + lam ||W' + M - W_l||^2 = W_l (H + lam I)(G + lam I)^{-1} - W'.

    gram G = X_s^T X_s / n, cross H = X_t^T X_s / n, both (d_in, d_in); lam as in `damped_cholesky`, so that
    truncating M0 in the damped G norm is the rank-r optimum of the same objective. The lam ||.-W_l|| term
    makes it exact when the recursive model already reproduces the original (X_s = X_t: M0 = W_l - W').
    """
    g, h = gram.double(), cross.double()
    lam = damping * g.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    rhs = original.double() @ (h + lam * eye)  # (d_out, d_in)
    return (torch.linalg.solve(g + lam * eye, rhs.mT).mT - shared.double()).float()  # G symmetric


def _refit_group(shared_layer: nn.Module, original_layer: nn.Module, group: list[str], depth: int, student_x, teacher_x, spec: CalibrationSpec) -> None:
    """Refit the depth's LoRA of every projection in one input group from the recursive model's inputs."""
    n = sum(x.shape[0] for x in student_x)
    gram = sum(x.double().mT @ x.double() for x in student_x) / n  # (d_in, d_in)
    cross = None
    if spec.inputs == "recursive_corrected":
        cross = sum(t.double().mT @ x.double() for t, x in zip(teacher_x, student_x)) / n  # (d_in, d_in)
    for rel in group:
        module = shared_layer.get_submodule(rel)
        if module.rank == 0:
            continue
        w_l, w_shared = original_layer.get_submodule(rel).weight.detach(), module.weight.detach()
        residual = w_l - w_shared if cross is None else corrected_residual(w_l, w_shared, gram, cross, spec.damping)
        us, vh = whitened_truncated_svd(residual, gram, module.rank, damping=spec.damping, seed=depth)
        module.lora_a.data[depth] = vh
        module.lora_b.data[depth] = us / module.scale


def _refit_position(call, shared_layer: nn.Module, original_layer: nn.Module, groups: list[list[str]], depth: int,
                    hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor], kwargs: list[dict], spec: CalibrationSpec) -> None:
    """The closed-form refit of one position, input group by input group in forward order, so that the o
    projection sees the refitted q/k/v. hidden: the recursive model's inputs here; teacher_hidden: the original's."""
    teacher_xs = [None] * len(groups)
    if spec.inputs == "recursive_corrected":  # the original layer does not change: all its groups in one pass
        teacher_xs = _run_capturing(original_layer, [original_layer.get_submodule(g[0]) for g in groups], teacher_hidden, kwargs)
    for group, teacher_x in zip(groups, teacher_xs):
        (student_x,) = _run_capturing(call, [shared_layer.get_submodule(group[0])], hidden, kwargs)
        _refit_group(shared_layer, original_layer, group, depth, student_x, teacher_x, spec)


@torch.no_grad()
def sequential_refit(student: nn.Module, original: nn.Module, stats: LayerStats, spec: CalibrationSpec, log=None) -> dict[int, tuple[float, float]]:
    """Calibrate every position in execution order on the activations the recursive model itself produces
    there, with the positions before it already calibrated (and reconstructed), as GPTQ quantises layer by
    layer on the quantised model's own inputs: the closed-form LoRA refit, then (spec.reconstruct) training
    towards the position's target, then the recursive hidden state is carried through the finished position.

    Target of position l: for "recursive_corrected" the original layer l's output on the ORIGINAL's hidden
    state (so l also corrects the drift of the positions before it); for "recursive" the original layer l
    applied to the recursive hidden state (the same objective as its refit, min ||(W_l - W' - BA) X_s||).
    Needs stats with hidden states. Returns reconstruction's {position: (relative error before, after)}."""
    from rrt_ray.models.arch import layers_path

    unrolled = student.unrolled_layers
    originals = original.get_submodule(layers_path(original.config.model_type))
    _freeze(student)
    hidden = list(stats.hidden_in[0])  # the embeddings: the same in both models, (b, L, d) per batch
    errors = {}
    for position in unrolled.positions:
        index, depth = position.position, position.depth
        call, kwargs, shared_layer = unrolled[index], stats.call_kwargs[index], unrolled.shared[position.shared]
        _refit_position(call, shared_layer, originals[index], _input_groups(stats, index), depth, hidden, stats.hidden_in[index], kwargs, spec)
        if spec.reconstruct:
            if spec.inputs == "recursive_corrected":
                targets = stats.hidden_out[index]
            else:
                targets = [_layer_output(originals[index](h, **kw)) for h, kw in zip(hidden, kwargs)]
            errors[index] = _train_position(call, shared_layer, depth, hidden, targets, kwargs, spec)
        hidden = [call(h, **kw) for h, kw in zip(hidden, kwargs)]
        if log is not None:
            err = sum((h - y).pow(2).sum() for h, y in zip(hidden, stats.hidden_out[index])) / sum(y.pow(2).sum() for y in stats.hidden_out[index])
            trained = f"; reconstruction {errors[index][0]:.3e} -> {errors[index][1]:.3e}" if index in errors else ""
            log(f"sequential position {index}: relative hidden-state error {err.item():.3e}{trained}")
    return errors


def original_stats(original: nn.Module, batches: torch.Tensor, spec: CalibrationSpec) -> LayerStats:
    """The statistics of the original model (fp32, eval) that a calibrated conversion needs."""
    from rrt_ray.models.arch import layers_path

    layers = original.get_submodule(layers_path(original.config.model_type))
    return collect_stats(original.eval(), layers, batches, spec.batch_size, keep_hidden=spec.reconstruct or spec.sequential)


def calibration_stats(src_path, spec: CalibrationSpec) -> LayerStats:
    """Load the original model at src_path (fp32) and gather the statistics over spec.sequences sequences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_path)
    batches = calibration_batches(tokenizer, spec)
    original = AutoModelForCausalLM.from_pretrained(src_path, dtype=torch.float32)
    return original_stats(original, batches, spec)


def calibrate_dir(model_dir, src_path, stats: LayerStats, spec: CalibrationSpec, dtype: torch.dtype, log=None) -> dict[int, tuple[float, float]]:
    """The calibration steps that need the converted model itself, in place in model_dir (fp32 arithmetic),
    saved again in `dtype`: the sequential pass (spec.inputs != "original": refit, and reconstruct each position
    in execution order) or the independent reconstruction (inputs="original"). Returns reconstruction's
    {position: (relative error before, after)} (empty without it)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if spec.sequential:
        original = AutoModelForCausalLM.from_pretrained(src_path, dtype=torch.float32).eval()
        errors = sequential_refit(student, original, stats, spec, log)
        del original
    else:
        errors = reconstruct(student, stats, spec, log) if spec.reconstruct else {}
    for old in list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.safetensors.index.json")):
        old.unlink()
    student.to(dtype).save_pretrained(model_dir)
    return errors
