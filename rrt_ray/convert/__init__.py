"""Conversion of Hugging Face checkpoints into (Relaxed) Recursive Transformers."""

from rrt_ray.convert.convert import ConversionPlan, ConvertReport, ConvertSpec, convert_checkpoint, plan_conversion
from rrt_ray.convert.init_strategies import INIT_STRATEGIES, init_source_layers
from rrt_ray.convert.svd import relative_error, truncated_svd

__all__ = [
    "INIT_STRATEGIES",
    "ConversionPlan",
    "ConvertReport",
    "ConvertSpec",
    "convert_checkpoint",
    "init_source_layers",
    "plan_conversion",
    "relative_error",
    "truncated_svd",
]
