"""The chunked LM-head loss (train/head_loss.py) against the whole-batch loss it replaces.

Every term is a sum over tokens, so chunking changes only the order of float additions: in float64 the two
agree to ~1e-12, and in fp32 on the tiny models to the ~1e-6 relative error of reordered fp32 sums.
"""

from __future__ import annotations

import pytest
import torch

from rrt_ray.train.head_loss import OutputHead, chunked_head_loss
from rrt_ray.train.losses import IGNORE_INDEX, KD_LOSSES, combined_loss, kd_divergence

N, H, V = 23, 6, 17  # 23 tokens: no chunk size below divides it evenly


def _problem(softcap=None, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(V, H, dtype=torch.float64, generator=gen))
    head_bias = torch.nn.Parameter(torch.randn(V, dtype=torch.float64, generator=gen)) if bias else None
    teacher = torch.randn(N, V, dtype=torch.float64, generator=gen) * 2
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[[0, 5, 6, 20]] = IGNORE_INDEX
    return hidden, OutputHead(weight, head_bias, softcap), teacher, targets


def _objective(targets, teacher, kind):
    def objective(exits, part):
        loss, ce, kd = combined_loss(exits[-1], targets[part], teacher[part], 0.3, kind, 2.0, reduction="sum")
        return loss, torch.stack([ce.detach(), kd.detach()])

    return objective


@pytest.mark.parametrize("kind", KD_LOSSES.names())
@pytest.mark.parametrize("chunk", [1, 4, 7, N, N + 5])
def test_chunked_loss_and_gradients_equal_the_whole_batch(kind, chunk):
    hidden, head, teacher, targets = _problem(softcap=3.0 if kind == "jsd" else None)
    counted = (targets != IGNORE_INDEX).sum()
    whole, ce, kd = combined_loss(head.logits(hidden), targets, teacher, 0.3, kind, 2.0)  # the mean-form reference
    expected = torch.autograd.grad(whole, [hidden, *head.params])

    loss, logged = chunked_head_loss([hidden], head, _objective(targets, teacher, kind), chunk)
    got = torch.autograd.grad(loss / counted, [hidden, *head.params])
    torch.testing.assert_close(loss / counted, whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(logged / counted, torch.stack([ce, kd]).detach(), rtol=1e-12, atol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_gradcheck_through_two_exits_and_a_frozen_bias():
    """torch's numerical gradient check (float64): two exits sharing the head, whose bias is frozen. (The
    early-exit objective's detached target is not a function gradcheck can difference; the tiny-model test
    below checks it against the whole-batch loss.)"""
    hidden, head, teacher, targets = _problem(bias=True, seed=1)
    other = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    head.bias.requires_grad_(False)

    def objective(exits, part):
        y = targets[part]
        loss = combined_loss(exits[1], y, None, 0.0, "forward_kl", 1.0, reduction="sum")[0]
        loss = loss + kd_divergence(exits[0], teacher[part], y, "jsd", 1.5, reduction="sum")
        return loss, loss.detach()[None]

    def f(h0, h1, weight):
        return chunked_head_loss([h0, h1], OutputHead(weight, head.bias, 2.0), objective, 5)[0]

    assert torch.autograd.gradcheck(f, (hidden, other, head.weight), eps=1e-6, atol=1e-6)


def test_softcap_is_applied():
    hidden, head, _, _ = _problem(softcap=0.5)
    logits = head.logits(hidden)
    assert logits.abs().max() <= 0.5
    plain = torch.nn.functional.linear(hidden, head.weight, head.bias)
    torch.testing.assert_close(logits, torch.tanh(plain / 0.5) * 0.5)


def test_bad_chunk_is_named():
    hidden, head, teacher, targets = _problem()
    with pytest.raises(ValueError, match="chunk must be >= 1 token, got 0"):
        chunked_head_loss([hidden], head, _objective(targets, teacher, "forward_kl"), 0)


@pytest.mark.parametrize("early_exit", [False, True])
def test_training_step_is_the_same_chunked_or_whole(make_config, tmp_path, early_exit):
    """The loop's loss on the tiny models, chunked (7 tokens a chunk) and whole: same loss, terms and gradients."""
    from rrt_ray import data
    from rrt_ray.train.loop import load_models, micro_batch_loss

    results = []
    for chunk in (0, 7):
        cfg = make_config(f"early_exit.enabled={str(early_exit).lower()}", "kd.weight=0.3", f"model.loss_chunk_tokens={chunk}")
        tokenizer, model, teacher = load_models(cfg, tmp_path)
        tokens = data.tokenize_texts(data.load_texts("default", "heldout", 20_000), tokenizer)
        batch = next(data.iter_eval_batches(tokens, 16, 3))
        batch["labels"][0, :4] = IGNORE_INDEX
        terms = micro_batch_loss(model, teacher, batch, cfg)
        terms["loss"].backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in terms.items()}, grads))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert whole.keys() == chunked.keys() and ("final_ce_loss" in whole) == early_exit
    for name in whole:
        assert chunked[name] == pytest.approx(whole[name], rel=1e-5), name
    assert whole_grads.keys() == chunked_grads.keys() and len(whole_grads) > 0
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
