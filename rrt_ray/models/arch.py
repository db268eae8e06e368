"""Per-architecture facts as data: where the decoder layers live and what the projections are called.

Supporting a new decoder family whose layers share one shape is a line here, not a new model file:
the Hugging Face decoder layer classes are reused as they are (their rotary, norm and activation
variants are the reference the conversion must match).
"""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# model_type -> attribute path of the decoder layer list inside the *ForCausalLM model.
LAYERS_PATH: dict[str, str] = {"gpt_neox": "gpt_neox.layers"}
DEFAULT_LAYERS_PATH = "model.layers"

# Families the test suite proves exact at full rank; any other decoder-only causal LM whose layers share
# one shape is attempted through the same generic path.
TESTED_FAMILIES: tuple[str, ...] = ("llama", "gemma", "gpt_neox", "qwen2", "mistral")

# The paper's projection names (q, k, v, o, gate, up, down) -> module names used by the families.
# GPT-NeoX fuses q, k and v into one matrix: asking for any of them targets `query_key_value`.
PROJECTION_ALIASES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "query_key_value"),
    "k": ("k_proj", "query_key_value"),
    "v": ("v_proj", "query_key_value"),
    "o": ("o_proj", "dense"),
    "gate": ("gate_proj",),
    "up": ("up_proj", "dense_h_to_4h"),
    "down": ("down_proj", "dense_4h_to_h"),
}
ALL_PROJECTIONS: tuple[str, ...] = tuple(PROJECTION_ALIASES)


def layers_path(model_type: str) -> str:
    return LAYERS_PATH.get(model_type, DEFAULT_LAYERS_PATH)


def check_supported(config: PreTrainedConfig) -> None:
    """Raise a ValueError naming the architecture when it cannot be looped."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"unsupported architecture {model_type!r}: rrt-ray converts decoder-only causal LMs whose layers "
            f"share one shape (tested: {', '.join(TESTED_FAMILIES)})"
        )
    if not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise ValueError(f"unsupported architecture {model_type!r}: its config has no num_hidden_layers")


def resolve_projections(names: list[str] | tuple[str, ...], available: set[str]) -> list[str]:
    """Map user-facing projection names (paper aliases or module names) onto this model's module names."""
    resolved: list[str] = []
    for name in names:
        candidates = PROJECTION_ALIASES.get(name, (name,))
        found = [c for c in candidates if c in available]
        if not found:
            raise ValueError(
                f"unknown projection {name!r} for this architecture; allowed: "
                f"{', '.join(ALL_PROJECTIONS)} or one of {', '.join(sorted(available))}"
            )
        resolved += [f for f in found if f not in resolved]
    return resolved
