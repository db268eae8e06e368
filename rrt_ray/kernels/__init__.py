"""Multi-LoRA kernels: every token applies the LoRA of its own loop depth (Triton, with torch beside).

    from rrt_ray.kernels import multi_lora, multi_lora_fused
    y = multi_lora(x, lora_a, lora_b, depth_index, scale)                     # (T, d_out)
    q, k, v = multi_lora_fused(x, [(a_q, b_q), (a_k, b_k), (a_v, b_v)], depth_index, scale)

Modules: `multi_lora` (checks, autograd Functions, backend choice), `triton_ops` (kernels and
launchers, imported lazily), `torch_ops` (references and CPU strategies), `segments` (tokens sorted
by depth), `bench` (the timing grid behind jobs/bench_lora.py).
"""

from rrt_ray.kernels.multi_lora import BACKENDS, multi_lora, multi_lora_fused, resolve_backend

__all__ = ["BACKENDS", "multi_lora", "multi_lora_fused", "resolve_backend"]
