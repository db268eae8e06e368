"""`rrt convert` with s3:// on both sides, against moto's S3 server over HTTP."""

import torch
from transformers import AutoModelForCausalLM

from rrt_ray import storage
from rrt_ray.cli import main
from rrt_ray.testing import VOCAB, tiny_model


def test_convert_from_and_to_s3(s3_server, tmp_path, capsys):
    original = tiny_model("qwen2")
    original.save_pretrained(tmp_path / "src")
    storage.upload_dir(str(tmp_path / "src"), s3_server.uri("models", "qwen2"))
    out = s3_server.uri("models", "qwen2-rrt")
    assert main(["convert", s3_server.uri("models", "qwen2"), out, "--loops", "2", "--lora-rank", "full", "--quiet"]) == 0
    assert out in capsys.readouterr().out
    storage.download_dir(out, str(tmp_path / "back"))  # verifies the checksum manifest
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert (model(tokens).logits - original(tokens).logits).abs().max() < 1e-4
    # a second conversion to the same OUT needs --overwrite
    assert main(["convert", s3_server.uri("models", "qwen2"), out, "--loops", "2", "--quiet"]) == 2
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err


def test_s3_without_credentials_is_one_clear_line(s3_server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert main(["convert", s3_server.uri("nothing"), str(tmp_path / "out"), "--loops", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "AWS_ACCESS_KEY_ID" in err[0] and "testing" not in err[0]
