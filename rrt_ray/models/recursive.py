"""RecursiveForCausalLM: a Hugging Face decoder whose N layers are K shared layers looped B times.

Notable features:
- Reuses the original architecture's *ForCausalLM class, built with K decoder layers, and replaces its
  layer list by `UnrolledLayers`, which presents N = B * K callables to the original forward. The
  original embeddings, rotary, masks, final norm, head, loss and `generate` therefore run unchanged.
- Weights are shared by looping one module, never by aliasing one Parameter into several modules
  (tied parameters are where DeepSpeed checkpoint conversion and PEFT merging break).
- Every linear layer of a shared layer is a `RelaxedLoRALinear` (shared W', per-depth LoRA and bias);
  every other parameter-holding module (norms) is a `PerDepth` unless `share_non_lora`.
- The KV cache has one slot per unrolled position: before a position runs, its attention module's
  `layer_idx` is set to the position, so loops never overwrite each other's keys and values.
- Activation checkpointing happens here, not in the HF layers, so that recomputation in the backward
  pass restores the depth and cache slot of the position being recomputed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from rrt_ray.models.arch import ARCHITECTURES, check_supported, layers_path
from rrt_ray.models.config import RecursiveConfig
from rrt_ray.models.layer_map import UnrolledPosition, tied_layers, unrolled_positions
from rrt_ray.models.lora import RelaxedLoRALinear
from rrt_ray.models.per_depth import PerDepth


class _PositionCall:
    """What the original model's layer loop sees at unrolled position l: a callable, not a module."""

    def __init__(self, layers: "UnrolledLayers", position: UnrolledPosition) -> None:
        self.layers, self.position = layers, position

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.layers.run(self.position, hidden_states, *args, **kwargs)


class UnrolledLayers(nn.Module):
    """K shared decoder layers presented as the N-entry layer list of the original model.

    >>> layers[3]          # the callable for unrolled position 3
    >>> layers[:N]         # what LlamaModel.forward iterates
    """

    def __init__(self, shared: nn.ModuleList, positions: list[UnrolledPosition]) -> None:
        super().__init__()
        self.shared = shared
        self.positions = positions
        self.gradient_checkpointing = False
        # Pass each token's depth as a tensor (the multi-LoRA kernels' per-token path, as continuous
        # depth-wise batching uses) even when all tokens share it; off: a python int, the fast path.
        self.per_token_depth = False
        # Early-exit training: when a list, the hidden state after every loop (CYCLE order) is appended.
        self.loop_outputs: list[torch.Tensor] | None = None
        self._loop_ends = {p.position for p in positions if p.shared == len(shared) - 1}
        self._calls = [_PositionCall(self, p) for p in positions]
        self._depth_modules = [[m for m in layer.modules() if isinstance(m, (RelaxedLoRALinear, PerDepth))] for layer in shared]
        self._attention_modules = [[m for m in layer.modules() if hasattr(m, "layer_idx")] for layer in shared]

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self):
        return iter(self._calls)

    def __getitem__(self, index: int | slice):
        return self._calls[index]

    def set_position(self, position: UnrolledPosition, depth: int | torch.Tensor | None = None) -> None:
        """Point the shared layer at one unrolled position: its depth's parameters and its cache slot.

        depth overrides the position's own depth with a per-token tensor (depth-wise batching).
        """
        for module in self._depth_modules[position.shared]:
            module.depth = position.depth if depth is None else depth
        for module in self._attention_modules[position.shared]:
            module.layer_idx = position.position

    def run(self, position: UnrolledPosition, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.shared[position.shared]

        def step(h: torch.Tensor) -> torch.Tensor:
            # runs again when the backward pass recomputes this step
            depth = torch.full(h.shape[:-1], position.depth, device=h.device) if self.per_token_depth else None
            self.set_position(position, depth)
            out = layer(h, *args, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            out = checkpoint(step, hidden_states, use_reentrant=False)
        else:
            out = step(hidden_states)
        if self.loop_outputs is not None and position.position in self._loop_ends:
            self.loop_outputs.append(out)
        return out


def _relax_layer(layer: nn.Module, config: RecursiveConfig, num_depths: int) -> None:
    """Swap, in place, every linear of a shared layer for a RelaxedLoRALinear and wrap its norms.

    num_depths: how many original layers are tied to this shared layer. One that stays unique while
    others loop (middle-cycle's first and last) gets no LoRA: its W' is its own original weight.
    """
    unique = num_depths < config.num_loops
    for name, module in list(layer.named_modules()):
        if module is layer:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        if isinstance(module, nn.Linear):
            relaxed = RelaxedLoRALinear(
                module.in_features,
                module.out_features,
                num_depths,
                0 if unique else config.lora_rank.get(leaf, 0),
                bias=module.bias is not None,
                share_bias=config.share_non_lora,
                scale=config.lora_scale,
                device=module.weight.device,
                dtype=module.weight.dtype,
            )
            setattr(parent, leaf, relaxed)
        elif any(True for _ in module.parameters(recurse=False)) and not config.share_non_lora:
            if any(True for _ in module.children()):
                raise ValueError(
                    f"unsupported layer structure: {type(module).__name__} at {name!r} holds parameters and "
                    "submodules; only linear layers and leaf modules (norms) can be kept per depth"
                )
            setattr(parent, leaf, PerDepth(module, num_depths))


def build_backbone(config: RecursiveConfig) -> PreTrainedModel:
    """The original *ForCausalLM class with K relaxed shared layers behind an N-position layer list."""
    text = config.text_config
    check_supported(text)
    num_layers, num_loops, sharing = text.num_hidden_layers, config.num_loops, config.sharing
    tied = tied_layers(num_layers, num_loops, sharing)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        for k, group in enumerate(tied):
            kinds = {layer_types[l] for l in group}
            if len(kinds) > 1:
                raise ValueError(
                    f"shared layer {k} would tie layers {group} of different attention types {sorted(kinds)}; "
                    f"choose loops/sharing so that tied layers have the same type"
                )
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(text)]
    # Build with K layers, then restore N: the modules read the config they were built with (attention
    # implementation, sliding windows), and caches and masks must see all N unrolled positions.
    text.num_hidden_layers = len(tied)
    if layer_types is not None:
        text.layer_types = [layer_types[group[0]] for group in tied]
    try:
        backbone = model_class(text)
    finally:
        text.num_hidden_layers = num_layers
        if layer_types is not None:
            text.layer_types = layer_types

    parent_name, _, attr = layers_path(text.model_type).rpartition(".")
    try:
        parent = backbone.get_submodule(parent_name)
    except AttributeError:
        parent = None
    shared = getattr(parent, attr, None)
    if not isinstance(shared, nn.ModuleList) or len({type(layer) for layer in shared}) != 1:
        raise ValueError(
            f"unsupported architecture {text.model_type!r}: no uniform decoder layer list at "
            f"{layers_path(text.model_type)!r} (tested: {ARCHITECTURES.allowed()})"
        )
    for layer, group in zip(shared, tied):
        _relax_layer(layer, config, num_depths=len(group))
    setattr(parent, attr, UnrolledLayers(shared, unrolled_positions(num_layers, num_loops, sharing)))
    return backbone


class RecursiveForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RecursiveConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: RecursiveConfig) -> None:
        super().__init__(config)
        self.backbone = build_backbone(config)
        self.post_init()

    @property
    def unrolled_layers(self) -> UnrolledLayers:
        return self.backbone.get_submodule(layers_path(self.config.text_config.model_type))

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def forward(self, *args, **kwargs):
        return self.backbone(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.unrolled_layers.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.unrolled_layers.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.unrolled_layers.gradient_checkpointing

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by role: shared block (without LoRA), LoRA, embeddings + head, other, total."""
        counts = {"shared": 0, "lora": 0, "embeddings": 0, "other": 0}
        embeddings = {id(p) for m in (self.get_input_embeddings(), self.get_output_embeddings()) for p in m.parameters()}
        shared = {id(p) for p in self.unrolled_layers.parameters()}
        for name, p in self.named_parameters():  # tied parameters are listed once
            if name.endswith(("lora_a", "lora_b")):
                counts["lora"] += p.numel()
            elif id(p) in shared:
                counts["shared"] += p.numel()
            elif id(p) in embeddings:
                counts["embeddings"] += p.numel()
            else:
                counts["other"] += p.numel()
        counts["total"] = sum(counts.values())
        return counts
