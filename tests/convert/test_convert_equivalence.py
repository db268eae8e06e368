"""Conversion against the real Hugging Face classes: exact at full rank, for every tested family.

Tolerance: logits of these tiny fp32 models are O(1); W' + U S V^T reproduces W to ~1e-7 relative,
so full-rank logits agree to ~1e-6 (measured 1.5e-7 .. 7.4e-7). 1e-4 leaves room for BLAS order
differences while any real mistake (a wrong layer, depth, norm or bias) moves logits by > 1e-2.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import rrt_ray
from rrt_ray.convert import convert_checkpoint
from rrt_ray.testing import VOCAB, tiny_model

FAMILIES = ["llama", "gemma", "gpt_neox", "qwen2", "mistral"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    out = {}
    for family in FAMILIES:
        model = tiny_model(family)
        model.save_pretrained(root / family)
        out[family] = (root / family, model)
    return out


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "loops, sharing",
    [(2, "cycle"), (2, "sequence"), (3, "cycle"), (3, "sequence"), (2, "middle_cycle"), (4, "middle_cycle")],
)
def test_full_rank_reproduces_the_original(sources, tmp_path, family, loops, sharing):
    src, original = sources[family]
    convert_checkpoint(str(src), str(tmp_path / "out"), loops=loops, sharing=sharing, init="average", lora_rank="full", progress=False)
    assert AutoConfig.from_pretrained(tmp_path / "out").model_type == "rrt_recursive"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model, rrt_ray.RecursiveForCausalLM)
    # middle_cycle keeps layers 1 and 6 unique and loops the 4 between them
    assert len(model.unrolled_layers.shared) == (4 // loops + 2 if sharing == "middle_cycle" else 6 // loops)
    tokens = torch.randint(0, VOCAB, (2, 13))
    diff = (_logits(model, tokens) - _logits(original, tokens)).abs().max().item()
    assert diff < 1e-4, f"{family} loops={loops} {sharing}: max abs diff {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_one_loop_without_lora_is_the_original_exactly(sources, tmp_path, family):
    src, original = sources[family]
    convert_checkpoint(str(src), str(tmp_path / "out"), loops=1, lora_rank=0, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, VOCAB, (2, 13))
    assert torch.equal(_logits(model, tokens), _logits(original, tokens))


def test_recursive_without_lora_is_a_different_model(sources, tmp_path):
    """Guards the tests above against passing vacuously: sharing weights must change the function."""
    src, original = sources["llama"]
    tokens = torch.randint(0, VOCAB, (2, 13))
    logits = {}
    for init in ("stepwise", "average"):
        convert_checkpoint(str(src), str(tmp_path / init), loops=2, init=init, lora_rank=0, progress=False)
        logits[init] = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / init).eval(), tokens)
        assert (logits[init] - _logits(original, tokens)).abs().max() > 1e-2
    assert (logits["stepwise"] - logits["average"]).abs().max() > 1e-3


def test_low_rank_error_falls_as_rank_grows(sources, tmp_path):
    src, original = sources["llama"]
    tokens = torch.randint(0, VOCAB, (2, 13))
    errors = []
    for rank in (0, 4, 12, "full"):
        convert_checkpoint(str(src), str(tmp_path / f"r{rank}"), loops=2, lora_rank=rank, progress=False)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"r{rank}").eval()
        errors.append((_logits(model, tokens) - _logits(original, tokens)).abs().max().item())
    assert errors[0] > errors[1] > errors[2] > errors[3], errors


def test_shared_weights_are_stored_once_per_shared_layer(sources, tmp_path):
    from safetensors import safe_open

    src, _ = sources["llama"]
    convert_checkpoint(str(src), str(tmp_path / "out"), loops=3, lora_rank=4, progress=False)
    names = set()
    for shard in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    q_weights = sorted(n for n in names if n.endswith("q_proj.weight"))
    assert q_weights == [f"backbone.model.layers.shared.{k}.self_attn.q_proj.weight" for k in range(2)]
    with safe_open(next((tmp_path / "out").glob("*00002-*.safetensors")), "pt") as f:
        assert tuple(f.get_slice("backbone.model.layers.shared.0.self_attn.q_proj.lora_a").get_shape()) == (3, 4, 48)


def test_bfloat16_storage_loads_and_stays_close(sources, tmp_path):
    src, original = sources["llama"]
    convert_checkpoint(str(src), str(tmp_path / "out"), loops=2, lora_rank="full", dtype="bfloat16", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 13))
    # bf16 keeps 8 mantissa bits: weights move by ~0.4% relative, logits by ~1e-2 here
    assert (_logits(model, tokens) - _logits(original, tokens)).abs().max() < 5e-2


def test_pytorch_bin_source_converts_exactly_with_average_init(sources, tmp_path):
    """A .bin source is memory-mapped: the average init must not write into the tensors it reads."""
    _, original = sources["llama"]
    original.config.save_pretrained(tmp_path / "bin")
    torch.save({n: t.contiguous() for n, t in original.state_dict().items()}, tmp_path / "bin" / "pytorch_model.bin")
    convert_checkpoint(str(tmp_path / "bin"), str(tmp_path / "out"), loops=2, init="average", lora_rank="full", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, VOCAB, (2, 13))
    assert (_logits(model, tokens) - _logits(original, tokens)).abs().max() < 1e-4
