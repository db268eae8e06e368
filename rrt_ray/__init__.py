"""rrt-ray: Relaxed Recursive Transformers on Ray.

Importing the package registers the recursive model with the transformers Auto classes, so that
`AutoConfig` / `AutoModelForCausalLM.from_pretrained(dir)` load a converted model directory.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from rrt_ray.models import RecursiveConfig, RecursiveForCausalLM

AutoConfig.register(RecursiveConfig.model_type, RecursiveConfig, exist_ok=True)
AutoModelForCausalLM.register(RecursiveConfig, RecursiveForCausalLM, exist_ok=True)

__all__ = ["RecursiveConfig", "RecursiveForCausalLM"]
__version__ = "0.1.0"
