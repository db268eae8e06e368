"""generate() with the KV cache keyed by unrolled position."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rrt_ray.convert import convert_checkpoint
from rrt_ray.testing import VOCAB, tiny_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    original = tiny_model("llama")
    original.save_pretrained(root / "src")
    out = {"original": original}
    for name, loops, sharing in ((2, 2, "cycle"), (3, 3, "cycle"), ("mid2", 2, "middle_cycle")):
        for rank, key in ((8, name), ("full", f"full{name}")):
            convert_checkpoint(str(root / "src"), str(root / str(key)), loops=loops, sharing=sharing, lora_rank=rank, progress=False)
            out[key] = AutoModelForCausalLM.from_pretrained(root / str(key)).eval()
    return out


@pytest.mark.parametrize("loops", [2, 3, "mid2"])
def test_greedy_generate_with_cache_equals_without(converted, loops):
    model = converted[loops]
    prompt = torch.randint(0, VOCAB, (2, 7))
    with_cache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    without = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert with_cache.shape == (2, 19)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("loops", [2, 3, "mid2"])  # mid2: middle_cycle, 2 loops over layers 2-5
def test_every_unrolled_position_has_its_own_cache_slot(converted, loops):
    """At full rank unrolled position l IS original layer l, so cache slot l must hold exactly the keys and
    values the original model caches at layer l: a loop overwriting another's slot, or a wrong slot map, fails."""
    tokens = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        cache = converted[f"full{loops}"](tokens, use_cache=True).past_key_values
        want = converted["original"](tokens, use_cache=True).past_key_values
    assert len(cache.layers) == len(want.layers) == 6
    for l, (got, ref) in enumerate(zip(cache.layers, want.layers)):
        # tolerance: full-rank reconstruction is exact to ~1e-6 on these O(1) activations (see test_convert_equivalence)
        torch.testing.assert_close(got.keys, ref.keys, rtol=1e-4, atol=1e-4, msg=f"keys of slot {l}")
        torch.testing.assert_close(got.values, ref.values, rtol=1e-4, atol=1e-4, msg=f"values of slot {l}")


def test_gradient_checkpointing_gives_the_same_gradients(converted):
    model = converted[2]
    model.train()
    tokens = torch.randint(0, VOCAB, (2, 9))
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing_enable() if checkpointing else model.gradient_checkpointing_disable()
        model.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.gradient_checkpointing_disable()
    model.eval()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)
