"""Lazy access to a source Hugging Face checkpoint: one tensor at a time, never the whole model.

Safetensors files are memory-mapped and read per tensor. Legacy `.bin` shards are opened with
`torch.load(weights_only=True, mmap=True)`: never unpickled as arbitrary objects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


def looks_like_hub_id(name: str) -> bool:
    """'org/name' (one slash, not a relative or absolute path): taken as a Hugging Face hub id."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve_source(src: str) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub (needs network)."""
    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"SRC {src!r} is a directory without config.json: not a Hugging Face model")
        return path
    if path.exists():
        raise ValueError(f"SRC {src!r} is a file; give a Hugging Face model directory or hub id")
    if not looks_like_hub_id(src):
        raise ValueError(f"SRC {src!r} does not exist (expected a local model directory, a hub id or s3:// URI)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # offline, unknown repo, gated: one clear line either way
        raise ValueError(f"SRC {src!r} is not a local directory and could not be fetched from the hub: {hub_reason(err)}") from err


def hub_reason(err: Exception) -> str:
    """The first line of a hub failure (huggingface_hub's messages run to several lines of advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no detail'}"


def checkpoint_renames(model: torch.nn.Module) -> list[tuple[re.Pattern, str]]:
    """The key renames transformers applies when loading this model (e.g. GPT-NeoX `embed_out.` -> `lm_head.`),
    from its own conversion table, so that source names match module names for every family."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renames = []
    for transform in get_model_conversion_mapping(model):
        if not isinstance(transform, WeightRenaming):
            raise ValueError(
                f"unsupported checkpoint layout for {type(model).__name__}: its weights need conversion "
                f"({type(transform).__name__}), not just renaming"
            )
        renames += [(re.compile(src), transform.target_patterns[0]) for src in transform.source_patterns]
    return renames


class SourceCheckpoint:
    def __init__(self, path: Path, renames: list[tuple[re.Pattern, str]] = ()) -> None:
        self.path = path
        self._renames = list(renames)
        self._where: dict[str, Path] = {}
        self._stored: dict[str, str] = {}  # module-style name -> name stored in the file
        if (path / SAFE_INDEX).is_file() or (path / SAFE_SINGLE).is_file():
            self._kind = "safetensors"
            files = self._files(SAFE_INDEX, SAFE_SINGLE)
            for file in files:
                with safe_open(file, framework="pt") as f:
                    self._index(f.keys(), file)
        elif (path / BIN_INDEX).is_file() or (path / BIN_SINGLE).is_file():
            self._kind = "bin"
            self._bins: dict[Path, dict[str, torch.Tensor]] = {}
            for file in self._files(BIN_INDEX, BIN_SINGLE):
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                self._bins[file] = state
                self._index(state.keys(), file)
        else:
            raise ValueError(f"SRC {str(path)!r} has no model.safetensors or pytorch_model.bin weights")

    def _index(self, stored_names, file: Path) -> None:
        for stored in stored_names:
            name = stored
            for pattern, target in self._renames:
                name = pattern.sub(target, name)
            self._where[name], self._stored[name] = file, stored

    def _files(self, index: str, single: str) -> list[Path]:
        if (self.path / index).is_file():
            weight_map = json.loads((self.path / index).read_text())["weight_map"]
            return sorted({self.path / f for f in weight_map.values()})
        return [self.path / single]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as fp32 (conversion arithmetic is always fp32)."""
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        if self._kind == "safetensors":
            with safe_open(self._where[name], framework="pt") as f:
                return f.get_tensor(self._stored[name]).float()
        return self._bins[self._where[name]][self._stored[name]].float()
