"""A relaxed recursive model gives the same logits and gradients through every multi-LoRA path.

The per-token path (a depth tensor per token, as continuous depth-wise batching uses) runs the
Triton kernels under TRITON_INTERPRET=1 and the torch strategy; both are compared with the int-depth
path (plain matmuls). Tolerance: fp32, logits O(1); different summation orders give ~1e-6.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rrt_ray.convert import convert_checkpoint
from rrt_ray.testing import VOCAB, tiny_model


@pytest.fixture(scope="module")
def relaxed(tmp_path_factory):
    root = tmp_path_factory.mktemp("relaxed")
    tiny_model("llama", num_layers=4).save_pretrained(root / "src")
    convert_checkpoint(str(root / "src"), str(root / "out"), loops=2, lora_rank=16, progress=False)
    return AutoModelForCausalLM.from_pretrained(root / "out")


def _run(model, tokens, backend, per_token, monkeypatch):
    monkeypatch.setenv("RRT_LORA_BACKEND", backend)
    model.unrolled_layers.per_token_depth = per_token
    model.zero_grad()
    out = model(tokens, labels=tokens)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.unrolled_layers.per_token_depth = False
    return out.logits.detach(), grads


def test_triton_torch_and_int_paths_agree(relaxed, monkeypatch):
    tokens = torch.randint(0, VOCAB, (2, 9))
    base_logits, base_grads = _run(relaxed, tokens, "torch", False, monkeypatch)
    assert any("lora_a" in n for n in base_grads) and any("lora_b" in n for n in base_grads)
    for backend in ("triton", "torch"):
        logits, grads = _run(relaxed, tokens, backend, True, monkeypatch)
        torch.testing.assert_close(logits, base_logits, rtol=0, atol=1e-5)
        assert grads.keys() == base_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, base_grads[name], rtol=1e-4, atol=1e-6, msg=f"{backend}: {name}")
