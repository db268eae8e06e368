"""A converted model's config.json says what it is: format version and provenance."""

import hashlib
import json

import pytest
from transformers import AutoConfig

import rrt_ray
from rrt_ray.convert import ConvertSpec, convert_checkpoint
from rrt_ray.models.config import FORMAT_VERSION
from rrt_ray.testing import tiny_model


def test_config_carries_format_version_source_checksums_options_and_version(tmp_path):
    tiny_model("llama", num_layers=4).save_pretrained(tmp_path / "src")
    spec = ConvertSpec(loops=2, init="stepwise", lora_rank=4, lora_targets=("q", "v"))
    convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), spec, progress=False)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["rrt_format_version"] == FORMAT_VERSION
    prov = saved["provenance"]
    assert prov["source"] == str(tmp_path / "src") and prov["rrt_ray_version"] == rrt_ray.__version__
    weights = (tmp_path / "src" / "model.safetensors").read_bytes()
    assert prov["source_sha256"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    assert set(prov["source_sha256"]) == {"config.json", "model.safetensors"}
    assert prov["conversion"] == spec.to_dict() and prov["conversion"]["lora_targets"] == ["q", "v"]
    assert AutoConfig.from_pretrained(tmp_path / "out").provenance == prov  # survives a load


def test_a_model_saved_by_a_newer_format_is_refused_with_one_clear_line(tmp_path):
    tiny_model("llama", num_layers=4).save_pretrained(tmp_path / "src")
    convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), loops=2, progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["rrt_format_version"] = FORMAT_VERSION + 1
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"rrt_format_version {FORMAT_VERSION + 1} is not one this rrt-ray reads"):
        AutoConfig.from_pretrained(tmp_path / "out")


def test_spec_and_keyword_fields_are_not_mixed(tmp_path):
    with pytest.raises(TypeError, match="either a ConvertSpec or its fields"):
        convert_checkpoint("a", "b", ConvertSpec(loops=2), loops=3)
