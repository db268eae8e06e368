"""Model paths resolved one way (directory, published root, s3:// of either) and checked from file headers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rrt_ray import storage
from rrt_ray.model_source import ModelError, check_model, fetch_model, resolve_model
from rrt_ray.testing import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "plain"
    tiny_model("llama", num_layers=2).save_pretrained(path)
    return path


def test_a_directory_and_a_published_root_resolve_to_the_model(model_dir, tmp_path):
    assert resolve_model(str(model_dir)).path == str(model_dir.resolve())
    root = tmp_path / "root"
    storage.publish_dir(str(model_dir), str(root), "step-2")
    storage.publish_dir(str(model_dir), str(root), "step-4")
    assert resolve_model(str(root)).path == str((root / "step-4").resolve())
    check_model(fetch_model(resolve_model(str(root))), str(root))


def test_s3_published_root_resolves_downloads_and_checks(model_dir, s3_server, tmp_path):
    root = s3_server.uri("models", "run")
    storage.publish_dir(str(model_dir), root, "final")
    source = resolve_model(root)
    assert source.path == root + "/final" and source.remote
    local = fetch_model(source, cache_dir=str(tmp_path))
    check_model(local, root)
    assert load_file(local / "model.safetensors").keys() == load_file(model_dir / "model.safetensors").keys()
    with pytest.raises(ModelError, match="no config.json and no \"latest\" marker"):
        resolve_model(s3_server.uri("models", "nothing"))


def _copy(model_dir, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for f in model_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


@pytest.mark.parametrize("damage,reason", [
    ("missing", "does not exist"),
    ("empty dir", "no config.json and no \"latest\""),
    ("garbage config", "config.json is not readable JSON"),
    ("unknown model_type", "does not describe a known model"),
    ("pickle only", "only pickle weights"),
    ("no weights", "has no weights"),
    ("lost tensor", "lack model.norm.weight"),
    ("wrong shape", "has shape (7,)"),
    ("bad header", "not a readable safetensors file"),
    ("broken tokenizer", "tokenizer files do not load"),
])
def test_a_model_that_cannot_be_served_fails_with_one_line(model_dir, tmp_path, damage, reason):
    path = _copy(model_dir, tmp_path)
    weights = path / "model.safetensors"
    if damage == "missing":
        path = tmp_path / "nowhere"
    elif damage == "empty dir":
        path = tmp_path / "empty"
        path.mkdir()
    elif damage == "garbage config":
        (path / "config.json").write_text("{not json")
    elif damage == "unknown model_type":
        (path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    elif damage == "pickle only":
        torch.save(load_file(weights), path / "pytorch_model.bin")
        weights.unlink()
    elif damage == "no weights":
        weights.unlink()
    elif damage in ("lost tensor", "wrong shape"):
        tensors = load_file(weights)
        if damage == "lost tensor":
            del tensors["model.norm.weight"]
        else:
            tensors["model.norm.weight"] = torch.ones(7)
        save_file(tensors, weights)
    elif damage == "bad header":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "broken tokenizer":
        (path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelError) as err:
        check_model(fetch_model(resolve_model(str(path))), str(path))
    message = str(err.value)
    assert reason in message and str(path) in message and "\n" not in message
