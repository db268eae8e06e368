"""Serving: the continuous depth-wise batching engine (plain Python) and its Ray Serve deployment.

`rrt_ray.serve.engine` does not import Ray; `rrt_ray.serve.app` and `rrt_ray.serve.launch` are the only modules here that do.
"""

from rrt_ray.serve.engine import Engine, EngineConfig, ExitPolicy, RequestOutput
from rrt_ray.serve.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "ExitPolicy", "RequestOutput", "SamplingParams"]
