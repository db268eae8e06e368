"""Write a Hugging Face model as a GGUF file the way llama.cpp's converter lays it out, for import tests.

Tensor names come from the `gguf` package's own name map (`blk.N.attn_q.weight`, `token_embd.weight`, ...),
tensors are F32 in GGUF's (reversed) dimension order, and the two layout changes llama.cpp makes are
applied here and undone by the importer: the q/k rows of Llama-type attention are permuted from the
rotate-half layout to interleaved pairs, and Gemma norm weights are stored as 1 + w.
The tokenizer is a small byte-level BPE trained on standard-library text, stored as GGUF "gpt2" metadata.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, Gemma2Config

from rrt_ray.testing import tiny_config

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
SPECIAL = ["<|endoftext|>", "<|pad|>"]
# GGUF architecture name per Hugging Face family (Mistral GGUFs carry no sliding window, so it is not tested).
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2"}
PERMUTED_QK = {"llama"}


def bpe_tokenizer(vocab_size: int = 300) -> Tokenizer:
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([text], trainer)
    return tok


def source_model(family: str, vocab_size: int, num_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A random fp32 model of the family with every layer (norms included) distinct."""
    if family == "gemma2":  # alternating sliding / full attention, a window shorter than the test sequence
        config = Gemma2Config(
            vocab_size=vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=8,
        )
    else:
        config = tiny_config(family, num_layers)
        config.vocab_size = vocab_size
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _to_llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rotate-half row order (HF) -> interleaved pairs (llama.cpp), per head."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model: torch.nn.Module, tokenizer: Tokenizer, path: str | Path, family: str, skip: tuple[str, ...] = ()) -> Path:
    """skip: GGUF tensor names to leave out (a file that does not set every parameter)."""
    cfg = model.config
    arch = GGUF_ARCH[family]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{family}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    if family == "gemma2":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_sliding_window(cfg.sliding_window)
    else:
        writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)

    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(pair) for pair in tokenizer.model.get_merges()] if hasattr(tokenizer.model, "get_merges") else _merges(tokenizer))
    writer.add_bos_token_id(vocab[SPECIAL[0]])
    writer.add_eos_token_id(vocab[SPECIAL[0]])
    writer.add_chat_template(CHAT_TEMPLATE)

    tied = set(model.all_tied_weights_keys)
    for hf_name, tensor in model.state_dict().items():
        if hf_name in tied:
            continue
        base, _, suffix = hf_name.rpartition(".")
        name = names.get_name(base)
        assert name is not None, f"no GGUF name for {hf_name}"
        weight = tensor.detach().float().numpy().copy()
        if family in PERMUTED_QK and name.endswith(("attn_q", "attn_k")):
            heads = cfg.num_attention_heads if name.endswith("attn_q") else cfg.num_key_value_heads
            weight = _to_llama_cpp_rows(weight, heads)
        if family == "gemma2" and "norm" in name:
            weight = weight + 1.0
        if f"{name}.{suffix}" not in skip:
            writer.add_tensor(f"{name}.{suffix}", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _merges(tokenizer: Tokenizer) -> list[str]:
    import json

    return [m if isinstance(m, str) else " ".join(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
