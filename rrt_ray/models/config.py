"""RecursiveConfig: the original model's config plus how it is looped.

It is a composite Hugging Face config: `text_config` is the ORIGINAL architecture's config, unchanged
(N layers). Generation, KV caches and attention masks read it through `get_text_config()` and so see
all N unrolled positions; only the model builds K = N / num_loops shared layers from it.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from rrt_ray.models.layer_map import SHARING_MODES, check_loops

# The version of the saved format (config.json fields and weight names). Bump it with any change a saved
# model would notice, and keep loading the older versions: tests/models/data holds one of each.
FORMAT_VERSION = 1


class RecursiveConfig(PreTrainedConfig):
    r"""
    text_config: the original decoder's config (any Hugging Face causal LM whose layers share one shape).
    num_loops: B, how many times the block of K = N / B shared layers runs.
    sharing: a mode of rrt_ray.models.layer_map.SHARING_MODES ("cycle": loop the whole block, "sequence":
        repeat each shared layer B times in a row, ...).
    lora_rank: LoRA rank per linear projection, keyed by the projection's module name inside a decoder
        layer ("q_proj", "down_proj", "query_key_value", ...). A projection not listed has rank 0.
    lora_scale: h = W'x + lora_scale * B A x.
    share_non_lora: share norm weights and biases across depths (the paper's ablation) instead of one
        copy per depth (the default, which keeps full-rank conversion exact).
    rrt_format_version: the saved format's version (FORMAT_VERSION when written by this code).
    provenance: what the model was made from: source model, its files' sha256, the conversion options and
        the rrt-ray version (written by `rrt convert`; later stages add theirs).
    init_strategy, lora_init: how the weights were initialised (provenance; read by `rrt convert`), names in
        rrt_ray.convert.init_strategies.INIT_STRATEGIES and rrt_ray.convert.lora_init.LORA_INITS.
    """

    model_type = "rrt_recursive"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    num_loops: int = 2
    sharing: str = "cycle"
    lora_rank: dict | None = None
    lora_scale: float = 1.0
    share_non_lora: bool = False
    init_strategy: str = "stepwise"
    lora_init: str = "svd"
    rrt_format_version: int = FORMAT_VERSION
    provenance: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.lora_rank is None:
            self.lora_rank = {}
        if not isinstance(self.rrt_format_version, int) or not 1 <= self.rrt_format_version <= FORMAT_VERSION:
            raise ValueError(
                f"rrt_format_version {self.rrt_format_version!r} is not one this rrt-ray reads (1..{FORMAT_VERSION}); "
                "the model was saved by a newer rrt-ray: upgrade it"
            )
        # The init registries live with their implementations in rrt_ray.convert, which imports this
        # module: read them at validation time, not at import.
        from rrt_ray.convert.init_strategies import INIT_STRATEGIES
        from rrt_ray.convert.lora_init import LORA_INITS

        SHARING_MODES.check(self.sharing)
        INIT_STRATEGIES.check(self.init_strategy)
        LORA_INITS.check(self.lora_init)
        bad = {name: r for name, r in self.lora_rank.items() if not isinstance(r, int) or r < 0}
        if bad:
            raise ValueError(f"LoRA ranks must be integers >= 0, got {bad}")
        check_loops(self.text_config.num_hidden_layers, self.num_loops, self.sharing)
        # Generation reads special tokens from the top-level config.
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name, None) is None and getattr(self.text_config, name, None) is not None:
                setattr(self, name, getattr(self.text_config, name))

    @property
    def num_shared_layers(self) -> int:
        return check_loops(self.text_config.num_hidden_layers, self.num_loops, self.sharing)
