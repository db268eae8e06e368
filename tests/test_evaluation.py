"""One perplexity: ignored labels (-100) count in neither the loss sum nor the token count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rrt_ray.evaluation import perplexity
from rrt_ray.train.loop import evaluate


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _batches(ignore_every: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 97, (2, 17), generator=generator)
        labels = ids[:, 1:].clone()
        labels[:, ::ignore_every] = -100  # e.g. padding or a prompt that is not scored
        batches.append({"input_ids": ids[:, :-1], "labels": labels})
    return batches


def _reference(model, batches) -> float:
    """exp(mean CE over the scored labels), with a plain forward and torch's cross_entropy."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"]).logits
            total += F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").item()
            count += int((batch["labels"] != -100).sum())
    return math.exp(total / count)


def test_both_perplexities_ignore_masked_labels_and_agree(tiny_llama):
    batches = _batches(ignore_every=3)
    expected = _reference(tiny_llama, batches)
    assert perplexity(tiny_llama, batches) == pytest.approx(expected, rel=1e-6)
    assert evaluate(tiny_llama, batches) == pytest.approx(expected, rel=1e-6)  # no process group: this rank only


def test_no_scored_token_is_an_error(tiny_llama):
    batch = _batches(ignore_every=1)[:1]
    with pytest.raises(ValueError, match="at least one scored held-out token"):
        perplexity(tiny_llama, batch)
