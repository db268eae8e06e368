"""Conversion of Hugging Face checkpoints into (Relaxed) Recursive Transformers."""

from rrt_ray.convert.convert import ConvertReport, ConvertSpec, convert_checkpoint
from rrt_ray.convert.init_strategies import INIT_STRATEGIES, init_source_layers
from rrt_ray.convert.svd import relative_error, truncated_svd

__all__ = [
    "INIT_STRATEGIES",
    "ConvertReport",
    "ConvertSpec",
    "convert_checkpoint",
    "init_source_layers",
    "relative_error",
    "truncated_svd",
]
