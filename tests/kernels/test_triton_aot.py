"""Every @triton.jit kernel compiles ahead of time to a cubin for sm_80 and sm_90, fp32/bf16/fp16 operands.

Runs the real compiler (TTIR -> PTX -> ptxas from the wheel) in a subprocess without TRITON_INTERPRET,
which tests/conftest.py sets for this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, triton
from rrt_ray.kernels import aot, triton_ops
found = sorted(n for n, v in vars(triton_ops).items() if isinstance(v, triton.runtime.jit.JITFunction))
results = []
for name, (kernel, tile_rule) in aot.kernels().items():
    for cap in aot.CAPABILITIES:
        for dtype in aot.DTYPE_NAMES:
            for tiles in sorted({tile_rule(*shape) for shape in aot.SHAPES}):
                cubin = aot.compile_kernel(kernel, tiles, dtype, cap)
                results.append([name, cap, aot.DTYPE_NAMES[dtype], cubin[:4].hex(), len(cubin)])
print(json.dumps({"found": found, "listed": sorted(aot.kernels()), "results": results}))
"""


@pytest.mark.slow
def test_every_kernel_compiles_to_a_cubin_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["found"] == report["listed"], "a new @triton.jit kernel must be listed in rrt_ray.kernels.aot.kernels()"
    combos = {(name, cap, dtype) for name, cap, dtype, _, _ in report["results"]}
    assert combos == {(k, c, d) for k in report["listed"] for c in (80, 90) for d in ("fp32", "bf16", "fp16")}
    assert all(magic == "7f454c46" and size > 1000 for *_, magic, size in report["results"])  # ELF cubins
