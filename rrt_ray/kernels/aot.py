"""Ahead-of-time compilation of every Triton kernel for real GPUs, on a machine without one.

    python -m rrt_ray.kernels.aot            # every kernel x sm_80, sm_90 x fp32, bf16, fp16 -> cubin sizes

`triton.compile(ASTSource(...), target=GPUTarget("cuda", capability, 32))` runs Triton's whole pipeline
(TTIR, TTGIR, LLVM, PTX, and ptxas from the wheel) to a cubin: it catches what the interpreter forgives
(tl.dot operand shapes and dtypes, layouts, shared memory). It must run with TRITON_INTERPRET unset:
under the interpreter `tl` is patched for eager execution and the compiler cannot trace the kernels.

Each kernel is compiled with the constexprs its launcher chooses for a serving-sized and a
training-sized call (`_tiles`, one rule for both kernels) and the dot configuration
`_dot_config` picks on CUDA for each operand dtype.
"""

from __future__ import annotations

import itertools

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CAPABILITIES = (80, 90)
INDEX_POINTERS = ("sorted_ids_ptr", "seg_start_ptr", "seg_len_ptr")
CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "DOT_FP32", "PRECISION")
# (tokens, n, k) of a serving decode step's shrink (rank 64 of a 576-wide projection) and of a training
# batch's expand: the launchers' tiles differ between the two regimes.
SHAPES = ((16, 64, 576), (4096, 576, 64))


def kernels() -> dict:
    """Every @triton.jit kernel of the package's Triton module, by name, with its launcher's tile rule."""
    from rrt_ray.kernels import triton_ops

    return {
        "_gather_matmul_kernel": (triton_ops._gather_matmul_kernel, triton_ops._tiles),
        "_segment_outer_kernel": (triton_ops._segment_outer_kernel, triton_ops._tiles),
    }


def signature(kernel, dtype: torch.dtype) -> dict[str, str]:
    """Triton's type string per argument: float tensors in `dtype`, index tensors int32, scale fp32."""
    sig = {}
    for name in kernel.arg_names:
        if name in INDEX_POINTERS:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + DTYPE_NAMES[dtype]
        elif name == "scale":
            sig[name] = "fp32"
        elif name in CONSTEXPRS:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(kernel, tiles: tuple[int, int, int], dtype: torch.dtype, capability: int) -> bytes:
    """The cubin of one kernel for one tile choice, operand dtype and compute capability."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dot_fp32 = dtype == torch.float32  # _dot_config on CUDA: fp32 dots for fp32, tensor cores otherwise
    constexprs = {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1], "BLOCK_K": tiles[2], "DOT_FP32": dot_fp32, "PRECISION": "ieee" if dot_fp32 else None}
    source = ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32)).asm["cubin"]


def compile_all(capabilities=CAPABILITIES, dtypes=tuple(DTYPE_NAMES)) -> dict[tuple[str, int, str, tuple], int]:
    """{(kernel, capability, dtype, tiles): cubin bytes} for every combination."""
    sizes = {}
    for (name, (kernel, tile_rule)), capability, dtype in itertools.product(kernels().items(), capabilities, dtypes):
        for tiles in sorted({tile_rule(*shape) for shape in SHAPES}):
            sizes[(name, capability, DTYPE_NAMES[dtype], tiles)] = len(compile_kernel(kernel, tiles, dtype, capability))
    return sizes


if __name__ == "__main__":
    for key, size in compile_all().items():
        print(*key, size)
