"""Tiny random models of the supported families, built from configs (no hub access needed).

Used by the test suite, the demo and the benchmarks. Norm weights and biases are perturbed away from
their 1/0 initialisation so that every layer differs from every other one in every parameter: an
equivalence test on such a model cannot pass by accident.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers import GemmaConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

VOCAB = 211  # odd on purpose


def tiny_config(family: str, num_layers: int = 6) -> PreTrainedConfig:
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=num_layers, num_attention_heads=4)
    if family == "llama":
        return LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=128)
    if family == "mistral":
        return MistralConfig(**common, num_key_value_heads=2, max_position_embeddings=128, sliding_window=64)
    if family == "qwen2":  # q/k/v biases
        return Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=128)
    if family == "gemma":  # (1 + w) RMSNorm, scaled embeddings, gelu, tied head
        return GemmaConfig(**common, num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
    if family == "gpt_neox":  # fused qkv, LayerNorm with bias, biases everywhere, partial rotary, parallel residual
        return GPTNeoXConfig(**common, max_position_embeddings=128, rotary_pct=0.5, tie_word_embeddings=False)
    raise ValueError(f"unknown family {family!r}; allowed: llama, mistral, qwen2, gemma, gpt_neox")


def tiny_model(family: str, num_layers: int = 6, seed: int = 0) -> torch.nn.Module:
    """A random model of the family in fp32 eval mode, with every layer distinct."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norm weights and biases
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def write_random_checkpoint(config: PreTrainedConfig, path: str, seed: int = 0) -> int:
    """Write a random checkpoint of `config` as one safetensors shard per layer; return its fp32 bytes.

    Streams layer by layer so that a 1B-parameter source can be produced without holding the model.
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tied = set(skeleton.all_tied_weights_keys)
    groups: dict[str, dict[str, torch.Size]] = {}
    for name, param in skeleton.named_parameters():
        if name in tied:
            continue
        parts = name.split(".")
        key = ".".join(parts[:3]) if ".layers." in name else "other"
        groups.setdefault(key, {})[name] = param.shape
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, (key, shapes) in enumerate(groups.items()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in shapes.items():
            if len(shape) == 1:  # norms around 1, biases around 0
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                tensors[name] = base + 0.1 * torch.randn(shape, generator=generator)
            else:
                tensors[name] = 0.02 * torch.randn(shape, generator=generator)
            weight_map[name] = file
            total += tensors[name].numel() * 4
        save_file(tensors, out / file, metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(out)
    return total
