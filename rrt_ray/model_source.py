"""Where a model to load lives, resolved one way for every entry point, and a cheap check that it loads.

    source = resolve_model("out/demo/uptrained")   # a model directory, or a published root -> its latest
    local = fetch_model(source)                     # s3:// downloaded once (checksummed) into a local cache
    check_model(local, source.uri)                  # one ModelError line if it cannot be served

Forms of a model path (`resolve_model`):
- a Hugging Face model directory (config.json, safetensors weights, tokenizer files optional);
- a published root: a directory whose `latest` marker (rrt_ray.storage.write_latest, as uptraining and
  pretraining publish) names a model directory beside it;
- either of those as an s3:// URI.
New forms (a GGUF file, from the real-model issue) are one more branch of `resolve_model` and `fetch_model`.

`check_model` judges a model from its files without loading tensors: config.json parses and names a known
architecture, the safetensors headers hold every weight the architecture needs with the right shape (pickle
checkpoints are refused: they are never unpickled), and tokenizer files, when present, load. It takes a few
seconds (mostly importing transformers), so jobs run it on the driver before any replica starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelError(ValueError):
    """A model path that cannot be served; the message is one line naming the path and the reason."""


@dataclass(frozen=True)
class ModelSource:
    """uri: what the user gave; path: the model directory it resolves to (local path or s3:// URI)."""

    uri: str
    path: str

    @property
    def remote(self) -> bool:
        from rrt_ray import storage

        return storage.is_remote(self.path)


def resolve_model(uri: str) -> ModelSource:
    """The model directory a model path names (see the module docstring); ModelError if there is none."""
    from rrt_ray import storage

    if not uri:
        raise ModelError("model path is empty: give a model directory, a published root or an s3:// URI")
    if storage.is_remote(uri):
        if storage.exists(storage.join(uri, "config.json")):
            return ModelSource(uri, uri.rstrip("/"))
        latest = storage.read_latest(uri)
        if latest is not None and storage.exists(storage.join(latest, "config.json")):
            return ModelSource(uri, latest)
        raise ModelError(f"model {uri!r}: no config.json and no \"latest\" marker naming a model directory")
    path = Path(uri).expanduser()
    if not path.exists():
        raise ModelError(f"model {uri!r} does not exist (expected a model directory, a published root or an s3:// URI)")
    if not path.is_dir():
        raise ModelError(f"model {uri!r} is a file; give a model directory, a published root or an s3:// URI")
    if (path / "config.json").is_file():
        return ModelSource(uri, str(path.resolve()))
    latest = storage.read_latest(str(path))
    if latest is not None and (Path(latest) / "config.json").is_file():
        return ModelSource(uri, str(Path(latest).resolve()))
    if latest is not None:
        raise ModelError(f"model {uri!r}: its \"latest\" marker names {latest!r}, which has no config.json")
    raise ModelError(f"model {uri!r} has no config.json and no \"latest\" marker naming a model directory")


def fetch_model(source: ModelSource, cache_dir: str | None = None) -> Path:
    """A local directory holding the model: the path itself, or an s3:// download cached by its URI."""
    from rrt_ray import storage

    if not source.remote:
        return Path(source.path)
    root = Path(cache_dir or os.path.join(tempfile.gettempdir(), "rrt-models"))
    local = root / hashlib.sha256(source.path.encode()).hexdigest()[:16]
    if not (local / "config.json").is_file():  # download_dir stages and verifies checksums before it lands
        storage.download_dir(source.path, str(local))
    return local


def check_model(local: Path, uri: str) -> None:
    """Raise ModelError (one line naming `uri`) unless the directory can be served; see the module docstring."""
    config = _check_config(local, uri)
    _check_weights(local, uri, config)
    _check_tokenizer(local, uri)


def _check_config(local: Path, uri: str):
    import rrt_ray  # noqa: F401  (registers the recursive model's config with the Auto classes)
    from transformers import AutoConfig

    try:
        json.loads((local / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"model {uri!r}: config.json is not readable JSON ({_one_line(err)})") from None
    try:
        return AutoConfig.from_pretrained(local)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"model {uri!r}: config.json does not describe a known model ({_one_line(err)})") from None


def _weight_files(local: Path, uri: str) -> list[Path]:
    if (local / SAFE_INDEX).is_file():
        try:
            weight_map = json.loads((local / SAFE_INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"model {uri!r}: {SAFE_INDEX} is not a readable index ({_one_line(err)})") from None
        files = sorted({local / name for name in weight_map.values()})
    elif (local / SAFE_SINGLE).is_file():
        files = [local / SAFE_SINGLE]
    elif any((local / name).exists() for name in PICKLE_WEIGHTS):
        raise ModelError(
            f"model {uri!r} has only pickle weights (pytorch_model.bin), which are never unpickled here; "
            "re-save it with save_pretrained() to get model.safetensors"
        )
    else:
        raise ModelError(f"model {uri!r} has no weights (no {SAFE_SINGLE} or {SAFE_INDEX})")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"model {uri!r}: weight file {missing[0]} named by {SAFE_INDEX} is missing")
    return files


def _stored_shapes(files: list[Path], uri: str) -> dict[str, tuple[int, ...]]:
    """name -> shape from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error types for a bad header)
            raise ModelError(f"model {uri!r}: {file.name} is not a readable safetensors file ({_one_line(err)})") from None
    return shapes


def _check_weights(local: Path, uri: str, config) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    stored = _stored_shapes(_weight_files(local, uri), uri)
    with torch.device("meta"):  # the architecture's parameter shapes, without memory
        model = AutoModelForCausalLM.from_config(config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        if name not in stored:
            raise ModelError(f"model {uri!r}: the weights lack {name} (shape {tuple(tensor.shape)}), which {type(model).__name__} needs")
        if stored[name] != tuple(tensor.shape):
            raise ModelError(f"model {uri!r}: weight {name} has shape {stored[name]}, {type(model).__name__} needs {tuple(tensor.shape)}")


def _check_tokenizer(local: Path, uri: str) -> None:
    """No tokenizer files: allowed (token-id prompts only). Files present: they must load."""
    if not any((local / name).is_file() for name in TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(local)
    except Exception as err:  # noqa: BLE001  (tokenizers raise many types; any of them means unusable files)
        raise ModelError(f"model {uri!r}: its tokenizer files do not load ({_one_line(err)})") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"
