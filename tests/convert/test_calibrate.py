"""Calibrated conversion: activation-aware truncation, activation-weighted shared init, reconstruction.

The statistics come from a real (tiny, random) Llama run over calibration tokens by the same hooks the
converter uses; the inputs X of each projection are captured separately here to check the norms directly.
"""

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
