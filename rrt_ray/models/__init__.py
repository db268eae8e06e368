"""Recursive and Relaxed Recursive Transformers built from Hugging Face decoder layers."""

from rrt_ray.models.config import RecursiveConfig
from rrt_ray.models.layer_map import UnrolledPosition, tied_layers, unrolled_positions
from rrt_ray.models.lora import RelaxedLoRALinear
from rrt_ray.models.per_depth import PerDepth
from rrt_ray.models.recursive import RecursiveForCausalLM, UnrolledLayers

__all__ = [
    "PerDepth",
    "RecursiveConfig",
    "RecursiveForCausalLM",
    "RelaxedLoRALinear",
    "UnrolledLayers",
    "UnrolledPosition",
    "tied_layers",
    "unrolled_positions",
]
