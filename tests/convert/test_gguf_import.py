"""GGUF as a model source: `rrt import`, `rrt convert model.gguf`, `model.teacher=model.gguf`.

The GGUF files are written here with the `gguf` package's writer in llama.cpp's naming and layout (see
gguf_helpers.py), from random Hugging Face models that serve as the reference.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import rrt_ray  # noqa: F401  (registers the recursive model)
from rrt_ray.cli import main
from rrt_ray.convert.gguf_import import resolve_model_path
from rrt_ray.train.prepare import resolve_model

from gguf_helpers import CHAT_TEMPLATE, bpe_tokenizer, source_model, write_gguf

FAMILIES = ("llama", "qwen2", "gemma2")  # gemma2: alternating sliding (window 8) / full attention
SEQ = 24  # longer than gemma2's window, so a lost sliding window changes the logits


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer):
    """family -> (reference model, its GGUF file)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for family in FAMILIES:
        model = source_model(family, tokenizer.get_vocab_size())
        out[family] = (model, write_gguf(model, tokenizer, root / f"tiny-{family}.gguf", family))
    return out


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RRT_CACHE_DIR", str(tmp_path / "cache"))


def _max_logit_diff(reference: torch.nn.Module, model_dir: Path, vocab: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (reference(ids).logits - model(ids).logits).abs().max().item()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_import_reproduces_the_source_logits(family, sources, tokenizer, tmp_path, capsys):
    reference, gguf_file = sources[family]
    out = tmp_path / "hf"
    assert main(["import", str(gguf_file), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _max_logit_diff(reference, out, tokenizer.get_vocab_size()) < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config.get("layer_types") == getattr(reference.config, "layer_types", None)
    imported = AutoTokenizer.from_pretrained(out)
    assert imported.chat_template == CHAT_TEMPLATE
    text = "def wrap(text, width=70):\n    return text"
    if family == "llama":  # the others get their family's own pre-tokenizer (Qwen2's split, Gemma's SentencePiece)
        assert imported(text)["input_ids"] == tokenizer.encode(text).ids
    elif family == "qwen2":
        assert imported.decode(imported(text)["input_ids"]) == text


def test_import_bfloat16_stores_bf16(sources, tmp_path):
    out = tmp_path / "bf16"
    assert main(["import", str(sources["llama"][1]), str(out), "--dtype", "bfloat16"]) == 0
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_convert_takes_a_gguf_source_and_caches_the_import(family, sources, tokenizer, tmp_path):
    reference, gguf_file = sources[family]
    out = tmp_path / "rrt"
    assert main(["convert", str(gguf_file), str(out), "--loops", "2", "--lora-rank", "full", "--quiet"]) == 0
    assert _max_logit_diff(reference, out, tokenizer.get_vocab_size()) < 1e-4
    cached = Path(resolve_model_path(str(gguf_file)))
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_model(str(gguf_file), "model.teacher")) == cached  # model.teacher=model.gguf: same cache
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp  # not imported again


def _unsupported_arch(tmp_path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv6")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / "rwkv.gguf"


def _incomplete(sources, tmp_path: Path) -> Path:
    model = sources["llama"][0]
    return write_gguf(model, bpe_tokenizer(), tmp_path / "incomplete.gguf", "llama", skip=("blk.1.ffn_norm.weight",))


def _truncated(sources, tmp_path: Path) -> Path:
    data = sources["llama"][1].read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda s, p: _unsupported_arch(p), "unsupported GGUF architecture 'rwkv6'"),
        (_truncated, "is not a readable GGUF file (truncated or corrupt"),
        (lambda s, p: p / "absent.gguf", "is not a file (expected a .gguf file)"),
        (_incomplete, "does not set 1 parameter(s) of llama, e.g. ['model.layers.1.post_attention_layernorm.weight']"),
    ],
    ids=["unsupported-arch", "truncated", "missing", "incomplete"],
)
def test_bad_gguf_exits_2_with_one_line_and_leaves_nothing(make, message, sources, tmp_path, capsys):
    src = make(sources, tmp_path)
    out = tmp_path / "out" / "model"
    assert main(["import", str(src), str(out)]) == 2
    line = _error_line(capsys)
    assert message in line and str(src.name) in line, line
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    assert main(["convert", str(src), str(tmp_path / "conv"), "--loops", "2", "--quiet"]) == 2
    assert not (tmp_path / "conv").exists()
