"""Per-architecture facts as data: one `ArchSpec` per decoder family, in the ARCHITECTURES registry.

Everything convert, train and serve need to know about a family's module layout is here: where the
decoder layers, the final norm and the rotary embedding live, what the pre-attention norm and the
projections are called, and whether keys/values are plain k/v projections plus rotary. Supporting a new
family whose layers share one shape is one `ARCHITECTURES.register(model_type, ArchSpec(...))` and a
test: the Hugging Face decoder layer classes are reused as they are (their rotary, norm and activation
variants are the reference the conversion must match).

A family that is not registered is attempted through `GENERIC_ARCH` (the Llama layout), as any
decoder-only causal LM whose layers share one shape may work; only registered families are tested.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers import PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from rrt_ray.registry import Registry

# The paper's projection names; each ArchSpec maps them onto its module names.
ALL_PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
_LLAMA_PROJECTIONS = {
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
    "gate": ("gate_proj",), "up": ("up_proj",), "down": ("down_proj",),
}  # fmt: skip


@dataclass(frozen=True)
class ArchSpec:
    """Module paths are relative to the family's *ForCausalLM model (the recursive model's `backbone`).

    layers: the decoder layer list. final_norm: the norm before the LM head (the exit heads reuse it).
    rotary: the rotary embedding module, called as rotary(hidden, position_ids) -> (cos, sin).
    input_norm: the pre-attention norm, an attribute of each decoder layer.
    projections: paper name (q, k, v, o, gate, up, down) -> module names inside a decoder layer; a fused
        matrix is listed under each name it holds (GPT-NeoX's query_key_value under q, k and v).
    kv_projections: (key, value) module names of the attention when its keys/values are exactly
        rotary(k(x)) and v(x), as the serving engine's CALM fill computes them; None when they are not
        (fused qkv, q/k norms): the engine then runs the whole attention module to fill.
    rotary_function: name, in the attention class's Python module, of fn(q, k, cos, sin) -> (q, k).
    """

    layers: str = "model.layers"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    input_norm: str = "input_layernorm"
    projections: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(_LLAMA_PROJECTIONS))
    kv_projections: tuple[str, str] | None = ("k_proj", "v_proj")
    rotary_function: str = "apply_rotary_pos_emb"

    def module(self, model: nn.Module, what: str) -> nn.Module:
        """The module at field `what` ("layers", "final_norm", "rotary") of a *ForCausalLM model."""
        path = getattr(self, what)
        try:
            return model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no {what.replace('_', ' ')} at {path!r}") from None

    def rotate_keys(self, attention: nn.Module, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """keys (1, H_kv, T, hd) -> the rotary-embedded keys, as the attention module's own forward applies it."""
        rotate = getattr(sys.modules[type(attention).__module__], self.rotary_function)
        _, keys = rotate(keys, keys, cos, sin)
        return keys


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture")
for _family in ("llama", "mistral", "qwen2", "gemma"):  # same layout; qwen2 adds q/k/v biases (still k/v + rotary)
    ARCHITECTURES.register(_family, ArchSpec())
ARCHITECTURES.register(
    "gpt_neox",
    ArchSpec(
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        rotary="gpt_neox.rotary_emb",
        projections={
            "q": ("query_key_value",), "k": ("query_key_value",), "v": ("query_key_value",), "o": ("dense",),
            "up": ("dense_h_to_4h",), "down": ("dense_4h_to_h",),
        },  # fmt: skip
        kv_projections=None,  # fused query_key_value
    ),
)
# Unregistered families: the Llama layout, with every registered family's projection names, and the
# whole attention module for KV fills (nothing is known about its keys and values).
GENERIC_ARCH = ArchSpec(
    projections={
        "q": ("q_proj", "query_key_value"), "k": ("k_proj", "query_key_value"), "v": ("v_proj", "query_key_value"),
        "o": ("o_proj", "dense"), "gate": ("gate_proj",), "up": ("up_proj", "dense_h_to_4h"),
        "down": ("down_proj", "dense_4h_to_h"),
    },  # fmt: skip
    kv_projections=None,
)


def arch_spec(model_type: str) -> ArchSpec:
    """The registered spec of a family, or GENERIC_ARCH for one that is not registered."""
    return ARCHITECTURES.get(model_type) if model_type in ARCHITECTURES else GENERIC_ARCH


def layers_path(model_type: str) -> str:
    return arch_spec(model_type).layers


def check_supported(config: PreTrainedConfig) -> None:
    """Raise a ValueError naming the architecture when it cannot be looped."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"unsupported architecture {model_type!r}: rrt-ray converts decoder-only causal LMs whose layers "
            f"share one shape (tested: {ARCHITECTURES.allowed()})"
        )
    if not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise ValueError(f"unsupported architecture {model_type!r}: its config has no num_hidden_layers")


def resolve_projections(names: list[str] | tuple[str, ...], available: set[str], model_type: str | None = None) -> list[str]:
    """Map user-facing projection names (paper names or module names) onto this model's module names."""
    aliases = (GENERIC_ARCH if model_type is None else arch_spec(model_type)).projections
    resolved: list[str] = []
    for name in names:
        candidates = aliases.get(name, (name,))
        found = [c for c in candidates if c in available]
        if not found:
            raise ValueError(
                f"unknown projection {name!r} for this architecture; allowed: "
                f"{', '.join(aliases)} or one of {', '.join(sorted(available))}"
            )
        resolved += [f for f in found if f not in resolved]
    return resolved
