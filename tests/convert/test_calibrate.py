"""Calibrated conversion: activation-aware truncation, activation-weighted shared init, reconstruction.

The statistics come from a real (tiny, random) Llama run over calibration tokens by the same hooks the
converter uses; the inputs X of each projection are captured separately here to check the norms directly.
"""

from pathlib import Path

import pytest
import torch

from rrt_ray.convert.calibrate import (
    CalibrationSpec,
    activation_error,
    activation_weighted_mean,
    original_stats,
    whitened_truncated_svd,
)
from rrt_ray.convert.svd import truncated_svd
from rrt_ray.models.layer_map import tied_layers
from rrt_ray.testing import VOCAB, tiny_model

LOOPS, RANK = 2, 4
TOKENIZER_VOCAB = 300  # the byte-level BPE needs at least 259


@pytest.fixture(scope="module")
def calibrated():
    """(original model, its stats, captured inputs {(layer, rel): X (n, d_in)}) on 6 sequences of 32 tokens."""
    model = tiny_model("llama", num_layers=4, seed=3)
    batches = torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(0))
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        for rel, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                hook = lambda m, a, o, key=(index, rel): inputs.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))
                handles.append(module.register_forward_hook(hook))
    stats = original_stats(model, batches, CalibrationSpec(sequences=6, seq_len=32, batch_size=4))
    for handle in handles:
        handle.remove()
    return model, stats, {key: torch.cat(xs) for key, xs in inputs.items()}


def _weight(model, layer: int, rel: str) -> torch.Tensor:
    return model.model.layers[layer].get_submodule(rel).weight.detach()


def test_moments_are_the_input_second_moments(calibrated):
    model, stats, inputs = calibrated
    for (layer, rel), x in inputs.items():
        torch.testing.assert_close(stats.moment(layer, rel), x.mT @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_activation_aware_truncation_error_is_at_most_plain_svd_for_every_projection(calibrated):
    model, stats, inputs = calibrated
    ratios = []
    for group in tied_layers(4, LOOPS, "cycle"):
        for (layer, rel), x in inputs.items():
            if layer not in group:
                continue
            shared = sum(_weight(model, l, rel) for l in group) / len(group)
            residual = _weight(model, layer, rel) - shared  # (d_out, d_in)
            us, vh = truncated_svd(residual, RANK)
            b, a = whitened_truncated_svd(residual, stats.moment(layer, rel), RANK)
            plain, aware = activation_error(residual, us, vh, x), activation_error(residual, b, a, x)
            assert aware <= plain * (1 + 1e-6), (layer, rel, aware, plain)  # fp32 factors, fp64 norms
            ratios.append(aware / plain)
    assert len(ratios) == 4 * 7 and min(ratios) < 0.95  # and it is not the plain SVD in disguise


def test_activation_weighted_shared_weight_minimises_the_activation_error(calibrated):
    model, stats, inputs = calibrated
    for group in tied_layers(4, LOOPS, "cycle"):
        for rel in ("self_attn.q_proj", "mlp.down_proj"):
            weights = [_weight(model, l, rel) for l in group]
            moments = [stats.moment(l, rel) for l in group]
            weighted = activation_weighted_mean(weights, moments, damping=0.0)
            plain = sum(weights) / len(weights)

            def cost(w):
                return sum(torch.linalg.matrix_norm((wl - w).double() @ inputs[(l, rel)].double().mT) ** 2 for wl, l in zip(weights, group))

            assert cost(weighted) <= cost(plain) * (1 + 1e-6)
            assert cost(weighted) < cost(plain) * 0.99


def test_full_rank_whitened_factors_reproduce_the_residual(calibrated):
    model, stats, _ = calibrated
    residual = _weight(model, 2, "mlp.down_proj") - _weight(model, 0, "mlp.down_proj")  # (48, 80)
    b, a = whitened_truncated_svd(residual, stats.moment(2, "mlp.down_proj"), 48)
    torch.testing.assert_close(b @ a, residual, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sequences": -1}, "--calibrate must be >= 0 sequences, got -1"),
        ({"sequences": 0, "reconstruct": True}, "--reconstruct needs --calibrate N"),
        ({"sequences": 4, "damping": -0.1}, "calibration damping must be >= 0, got -0.1"),
    ],
)
def test_bad_calibration_options_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        CalibrationSpec(**kwargs)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A tiny Llama directory with a small byte-level BPE tokenizer, so calibration tokenises real text."""
    from rrt_ray.data.tokenizer import train_bpe_tokenizer

    from gguf_helpers import source_model

    path = tmp_path_factory.mktemp("calib") / "src"
    model = source_model("llama", TOKENIZER_VOCAB, num_layers=4, seed=5)
    tokenizer = train_bpe_tokenizer(["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50], vocab_size=TOKENIZER_VOCAB)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def _logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(ids).logits


def _corpus(tmp_path) -> str:
    """A small training split of real text: fast to tokenise."""
    import sysconfig

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, path in enumerate(sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py"))):
        (corpus / f"doc{i}.txt").write_text(path.read_text())
    return str(corpus)


def _spy_on_training(monkeypatch) -> list[dict]:
    """Record every position's reconstruction: what it trained on and its relative error before and after."""
    from rrt_ray.convert import calibrate

    calls, real = [], calibrate._train_position

    def spy(call, layer, depth, inputs, targets, kwargs, spec):
        before, after = real(call, layer, depth, inputs, targets, kwargs, spec)
        calls.append({"inputs": inputs, "targets": targets, "kwargs": kwargs, "before": before, "after": after})
        return before, after

    monkeypatch.setattr(calibrate, "_train_position", spy)
    return calls


@pytest.mark.parametrize("inputs", ["original", "recursive", "recursive_corrected"])
def test_reconstruction_is_exact_at_full_rank_and_never_ends_worse_at_low_rank(tiny_src, tmp_path, monkeypatch, inputs):
    from rrt_ray.convert import convert_checkpoint

    src, original = tiny_src
    calibration = {"sequences": 4, "seq_len": 32, "data": _corpus(tmp_path), "inputs": inputs, "reconstruct": True, "reconstruct_steps": 20, "sequences": 32, "batch_size": 8}
    ids = torch.randint(0, TOKENIZER_VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = original(ids).logits
    convert_checkpoint(str(src), str(tmp_path / "full"), loops=2, lora_rank="full", calibration=calibration, progress=False)
    assert (_logits(tmp_path / "full", ids) - reference).abs().max().item() < 1e-4

    calls = _spy_on_training(monkeypatch)
    convert_checkpoint(str(src), str(tmp_path / "r2"), loops=2, lora_rank=2, calibration=calibration, progress=False)
    assert len(calls) == 4 and all(c["after"] <= c["before"] for c in calls)
    calls.clear()  # a learning rate that overshoots: the best parameters seen are kept, never worse than the start
    convert_checkpoint(str(src), str(tmp_path / "r2-lr"), loops=2, lora_rank=2, calibration={**calibration, "reconstruct_lr": 3.0}, progress=False)
    assert len(calls) == 4 and all(c["after"] <= c["before"] for c in calls)


def test_training_a_position_moves_only_its_depth_and_generalises_to_the_held_out_batch(tiny_src, tmp_path):
    """Targets the position can reach (its own output with a perturbed LoRA): training on the first batches
    must bring the error on the held-out one well down, and touch neither W' nor the other depth's slice."""
    from transformers import AutoModelForCausalLM

    from rrt_ray.convert import calibrate, convert_checkpoint

    src, original = tiny_src
    convert_checkpoint(str(src), str(tmp_path / "r2"), loops=2, lora_rank=2, progress=False)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "r2", dtype=torch.float32).eval()
    spec = CalibrationSpec(sequences=16, seq_len=32, batch_size=4, reconstruct=True, reconstruct_steps=30, reconstruct_lr=1e-2)
    stats = original_stats(original, torch.randint(0, TOKENIZER_VOCAB, (16, 32), generator=torch.Generator().manual_seed(5)), spec)
    calibrate._freeze(student)
    unrolled, position = student.unrolled_layers, student.unrolled_layers.positions[2]  # shared layer 0, depth 1
    call, layer = unrolled[2], unrolled.shared[0]
    inputs, kwargs = stats.hidden_in[2], stats.call_kwargs[2]  # 4 batches: 3 to train on, 1 held out
    params = calibrate._position_parameters(layer)
    start = [p.detach().clone() for p in params]
    frozen = {name: p.detach().clone() for name, p in layer.named_parameters() if all(p is not q for q in params)}
    with torch.no_grad():
        for p in params:  # the targets: this depth's parameters moved by ~30% of their size
            p.data[1] += 0.3 * p.data[1].std() * torch.randn(p.data[1].shape, generator=torch.Generator().manual_seed(6))
        targets = [call(h, **kw) for h, kw in zip(inputs, kwargs)]
        for p, s in zip(params, start):
            p.data.copy_(s)
    trained_on = []  # which batches went through the layer with gradients on

    def recording_call(h, **kw):
        if torch.is_grad_enabled():
            trained_on.extend(i for i, x in enumerate(inputs) if x is h)
        return call(h, **kw)

    before, after = calibrate._train_position(recording_call, layer, position.depth, inputs, targets, kwargs, spec)
    assert sorted(set(trained_on)) == [0, 1, 2]  # the last batch only judges
    assert after < 0.5 * before, (before, after)  # a no-op keeps 1.0 (seen 0.18)
    for p, s in zip(params, start):
        torch.testing.assert_close(p.detach()[0], s[0], rtol=0, atol=0)  # depth 0 belongs to position 0
    for name, p in layer.named_parameters():
        if name in frozen:
            torch.testing.assert_close(p.detach(), frozen[name], rtol=0, atol=0)  # W' stays frozen


@pytest.mark.parametrize("inputs", ["recursive", "recursive_corrected"])
def test_sequential_reconstruction_trains_each_position_on_the_recursive_models_own_hidden_state(tiny_src, tmp_path, monkeypatch, inputs):
    """Position l is reconstructed on the hidden state the FINAL recursive model produces before l (positions
    0..l-1 calibrated and reconstructed), not on the original's, towards the original layer l's output: on the
    original's hidden state (recursive_corrected) or on the recursive one (recursive)."""
    from transformers import AutoModelForCausalLM

    from rrt_ray.convert import convert_checkpoint

    src, original = tiny_src
    calibration = {"sequences": 4, "seq_len": 32, "data": _corpus(tmp_path), "inputs": inputs, "reconstruct": True, "reconstruct_steps": 20, "sequences": 32, "batch_size": 8}
    calls = _spy_on_training(monkeypatch)
    convert_checkpoint(str(src), str(tmp_path / "r2"), loops=2, lora_rank=2, calibration=calibration, progress=False)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "r2", dtype=torch.float32).eval()
    assert len(calls) == 4
    with torch.no_grad():
        recursive, teacher = calls[0]["inputs"][0], calls[0]["inputs"][0]  # (b, L, d): the embeddings, shared
        for position, call in enumerate(calls):
            kwargs = call["kwargs"][0]
            # tolerance: fp32 layers of O(1) activations, the same ops in the same order (seen ~1e-6)
            torch.testing.assert_close(call["inputs"][0], recursive, rtol=0, atol=1e-5)
            target = original.model.layers[position](teacher if inputs == "recursive_corrected" else recursive, **kwargs)
            torch.testing.assert_close(call["targets"][0], target, rtol=0, atol=1e-5)
            if position > 0:  # the models have drifted apart far beyond the tolerance: the check can tell them apart
                assert (recursive - teacher).abs().max().item() > 100 * 1e-5
            recursive = student.unrolled_layers[position](recursive, **kwargs)
            teacher = original.model.layers[position](teacher, **kwargs)


def test_reconstruct_without_calibrate_exits_2(tiny_src, tmp_path, capsys):
    from rrt_ray.cli import main

    assert main(["convert", str(tiny_src[0]), str(tmp_path / "out"), "--loops", "2", "--reconstruct", "--quiet"]) == 2
    assert "--reconstruct needs --calibrate N" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_corrected_residual_is_the_least_squares_optimum_and_its_truncation_beats_the_other_targets():
    """M0 solves min ||W_l X_t - (W' + M) X_s||; truncating it in the X_s norm beats truncating W_l - W'
    (the sequential fit without correction) and the original-input fit on that objective."""
    from rrt_ray.convert.calibrate import corrected_residual

    g = torch.Generator().manual_seed(4)
    n, d_in, d_out, rank = 400, 24, 16, 3
    x_t = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d_in, dtype=torch.float64)
    # the recursive model's inputs drift by a rank-1 map, and W' differs from W_l by rank 1: a rank-3 LoRA
    # can undo both (the corrected target W_l T^-1 - W' has rank <= 2), the uncorrected one only the latter
    drift = torch.eye(d_in, dtype=torch.float64) + 0.5 * torch.randn(d_in, 1, generator=g, dtype=torch.float64) @ torch.randn(1, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    x_s = x_t @ drift.mT + 0.01 * torch.randn(n, d_in, generator=g, dtype=torch.float64)
    w_l = torch.randn(d_out, d_in, generator=g)
    w_shared = w_l - torch.randn(d_out, 1, generator=g) @ torch.randn(1, d_in, generator=g)
    gram, cross = (x_s.mT @ x_s / n).float(), (x_t.mT @ x_s / n).float()
    m0 = corrected_residual(w_l, w_shared, gram, cross, damping=0.0)
    lstsq = torch.linalg.lstsq(x_s, x_t @ w_l.double().mT).solution.mT - w_shared.double()  # (d_out, d_in)
    torch.testing.assert_close(m0.double(), lstsq, rtol=1e-4, atol=1e-4)

    def cost(b, a):
        return torch.linalg.matrix_norm(x_t @ w_l.double().mT - x_s @ (w_shared.double() + b.double() @ a.double()).mT).item()

    corrected = cost(*whitened_truncated_svd(m0, gram, rank, damping=0.0))
    uncorrected = cost(*whitened_truncated_svd(w_l - w_shared, gram, rank, damping=0.0))
    teacher_inputs = cost(*whitened_truncated_svd(w_l - w_shared, (x_t.mT @ x_t / n).float(), rank, damping=0.0))
    assert corrected <= min(uncorrected, teacher_inputs) * (1 + 1e-6)
    assert corrected < 0.1 * uncorrected  # the correction matters for drifted inputs
    # no drift: the target is the plain residual again, with or without damping (exact at full rank)
    same = corrected_residual(w_l, w_shared, gram, gram, damping=0.01)
    torch.testing.assert_close(same, w_l - w_shared, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inputs", ["recursive", "recursive_corrected"])
def test_sequential_calibration_is_exact_at_full_rank_and_refits_at_low_rank(tiny_src, tmp_path, inputs):
    from safetensors.torch import load_file

    from rrt_ray.convert import convert_checkpoint

    src, original = tiny_src
    calibration = {"sequences": 4, "seq_len": 32, "data": _corpus(tmp_path)}
    ids = torch.randint(0, TOKENIZER_VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = original(ids).logits
    convert_checkpoint(str(src), str(tmp_path / "full"), loops=2, lora_rank="full", calibration={**calibration, "inputs": inputs}, progress=False)
    assert (_logits(tmp_path / "full", ids) - reference).abs().max().item() < 1e-4

    def lora(name):  # every depth's LoRA B of every layer, {tensor name: (B, d_out, r)}
        tensors = {}
        for f in sorted((tmp_path / name).glob("*.safetensors")):
            tensors.update({k: v for k, v in load_file(f).items() if k.endswith("lora_b")})
        return tensors

    convert_checkpoint(str(src), str(tmp_path / "plain"), loops=2, lora_rank=2, calibration={**calibration, "inputs": "original"}, progress=False)
    convert_checkpoint(str(src), str(tmp_path / "seq"), loops=2, lora_rank=2, calibration={**calibration, "inputs": inputs}, progress=False)
    plain, seq = lora("plain"), lora("seq")
    assert plain.keys() == seq.keys() and len(plain) == 2 * 7
    # the second loop's inputs have drifted from the original's, so its LoRA is refitted
    assert any(not torch.allclose(seq[n][1], plain[n][1], atol=1e-4) for n in plain)


def test_unknown_calibration_inputs_name_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown calibration inputs 'teacher'; allowed: original, recursive, recursive_corrected"):
        CalibrationSpec(sequences=4, inputs="teacher")
