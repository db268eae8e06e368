"""KD divergences and the LR schedules against values computed by hand."""

import math

import pytest
import torch

from rrt_ray.train.losses import IGNORE_INDEX, combined_loss, cross_entropy, kd_divergence
from rrt_ray.train.schedule import lr_multiplier


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


# One token, vocab 3: logits chosen so the softmaxes are easy to check by hand.
STUDENT = [0.0, math.log(2.0), math.log(3.0)]  # softmax (1/6, 2/6, 3/6)
TEACHER = [math.log(3.0), math.log(2.0), 0.0]  # softmax (3/6, 2/6, 1/6)


def _tensors(*rows):
    return torch.tensor([rows], dtype=torch.float32)  # (1, T, V)


def test_forward_kl_by_hand():
    p_t, p_s = [3 / 6, 2 / 6, 1 / 6], [1 / 6, 2 / 6, 3 / 6]
    expected = _kl(p_t, p_s)  # = (1/2) ln 3 - (1/6) ln 3 = (1/3) ln 3
    assert expected == pytest.approx(math.log(3) / 3)
    got = kd_divergence(_tensors(STUDENT), _tensors(TEACHER), torch.zeros(1, 1, dtype=torch.long), "forward_kl")
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_reverse_kl_is_kl_of_student_from_teacher():
    s = [0.0, 1.0, -1.0]
    t = [0.5, 0.0, 0.2]
    expected = _kl(_softmax(s), _softmax(t))
    got = kd_divergence(_tensors(s), _tensors(t), torch.zeros(1, 1, dtype=torch.long), "reverse_kl")
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_jsd_by_hand_and_bounded_by_ln2():
    p_t, p_s = [3 / 6, 2 / 6, 1 / 6], [1 / 6, 2 / 6, 3 / 6]
    m = [(a + b) / 2 for a, b in zip(p_t, p_s)]  # (2/6, 2/6, 2/6)
    expected = 0.5 * _kl(p_t, m) + 0.5 * _kl(p_s, m)
    got = kd_divergence(_tensors(STUDENT), _tensors(TEACHER), torch.zeros(1, 1, dtype=torch.long), "jsd")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    far = kd_divergence(_tensors([50.0, 0.0]), _tensors([0.0, 50.0]), torch.zeros(1, 1, dtype=torch.long), "jsd")
    assert far.item() == pytest.approx(math.log(2), rel=1e-4)


def test_temperature_softens_and_scales_by_t_squared():
    t = 2.0
    expected = _kl(_softmax(TEACHER, t), _softmax(STUDENT, t)) * t * t
    got = kd_divergence(_tensors(STUDENT), _tensors(TEACHER), torch.zeros(1, 1, dtype=torch.long), "forward_kl", t)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ignored_positions_count_in_neither_loss():
    student = _tensors(STUDENT, [9.0, -9.0, 0.0])
    teacher = _tensors(TEACHER, [-9.0, 9.0, 0.0])
    targets = torch.tensor([[2, IGNORE_INDEX]])
    kd = kd_divergence(student, teacher, targets, "forward_kl")
    assert kd.item() == pytest.approx(math.log(3) / 3, rel=1e-6)
    ce = cross_entropy(student, targets)
    assert ce.item() == pytest.approx(-math.log(3 / 6), rel=1e-6)


def test_combined_loss_weights_ce_and_kd():
    student, teacher, targets = _tensors(STUDENT), _tensors(TEACHER), torch.tensor([[0]])
    loss, ce, kd = combined_loss(student, targets, teacher, 0.25, "forward_kl", 1.0)
    assert ce.item() == pytest.approx(math.log(6), rel=1e-6)
    assert loss.item() == pytest.approx(0.75 * math.log(6) + 0.25 * math.log(3) / 3, rel=1e-6)
    loss, _, kd = combined_loss(student, targets, None, 0.25, "forward_kl", 1.0)
    assert loss.item() == pytest.approx(math.log(6), rel=1e-6) and kd.item() == 0.0


def test_kd_gradient_vanishes_when_student_equals_teacher():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        loss = kd_divergence(logits, logits.detach().clone(), torch.zeros(2, 5, dtype=torch.long), kind)
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == pytest.approx(0.0, abs=1e-6) and grad.abs().max().item() < 1e-6


def test_cosine_schedule_values():
    f = lr_multiplier("cosine", warmup_steps=4, max_steps=14, min_ratio=0.1)
    assert [round(f(s), 6) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_wsd_schedule_values():
    f = lr_multiplier("wsd", warmup_steps=2, max_steps=20, min_ratio=0.0, decay_fraction=0.5)
    assert f(0) == pytest.approx(1 / 3) and f(2) == 1.0 and f(9) == 1.0
    assert f(10) == 1.0 and f(15) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="allowed: cosine, wsd, constant"):
        lr_multiplier("step", 1, 2, 0.0)
