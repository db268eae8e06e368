"""Users' saved models keep loading: a tiny model saved in format version 1 is committed with its logits.

tests/models/data/rrt_format_v1/ was written once by `python tests/models/test_saved_format.py` (a
4-layer random Llama converted with 2 loops, cycle sharing, LoRA rank 4, per-depth norms) together with
expected_logits.safetensors (the input tokens and the logits that model gave). If a change to the model
code, the weight names or the config fields alters what a saved model means, this test fails: bump
FORMAT_VERSION, keep loading the old format, and commit a fixture of the new one beside this one.
Never regenerate this fixture to make the test pass.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import rrt_ray

FIXTURE = Path(__file__).parent / "data" / "rrt_format_v1"


def test_format_v1_model_loads_and_gives_the_saved_logits():
    config = json.loads((FIXTURE / "config.json").read_text())
    assert config["rrt_format_version"] == 1 and config["model_type"] == "rrt_recursive"
    model = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    assert isinstance(model, rrt_ray.RecursiveForCausalLM)
    expected = load_file(FIXTURE / "expected_logits.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits  # (2, 9, V)
    # Same weights and ops on the same machine class: fp32 rounding only (BLAS order), far below the ~1e-1
    # a wrong depth, slot or norm would cause on these O(1) logits.
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)


def _write_fixture(out: Path) -> None:
    from rrt_ray.convert import convert_checkpoint
    from rrt_ray.testing import VOCAB, tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        tiny_model("llama", num_layers=4).save_pretrained(Path(scratch) / "src")
        convert_checkpoint(str(Path(scratch) / "src"), str(out), loops=2, lora_rank=4, overwrite=True, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids).logits
    save_file({"input_ids": input_ids, "logits": logits.contiguous()}, out / "expected_logits.safetensors")


if __name__ == "__main__":
    _write_fixture(Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURE)
