"""`rrt convert` as a user runs it: exit codes, one clear line on bad input, nothing half-written."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from rrt_ray.cli import main
from rrt_ray.testing import VOCAB, tiny_model


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "src"
    tiny_model("llama").save_pretrained(path)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_console_script_converts_and_prints_the_parameter_table(src, tmp_path):
    rrt = os.path.join(os.path.dirname(sys.executable), "rrt")
    out = tmp_path / "out"
    run = subprocess.run(
        [rrt, "convert", str(src), str(out), "--loops", "2", "--lora-rank", "4", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    for role in ("shared", "lora", "embeddings", "total", "original"):
        assert role in run.stdout
    model = AutoModelForCausalLM.from_pretrained(out)  # rrt_ray registered itself via the console script's import
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w5 w7 w9", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loops", "4"], "layer count 6 is not divisible by loops=4; allowed loops: [1, 2, 3, 6]"),
        (["--loops", "2", "--lora-rank", "500"], "--lora-rank 500 is larger than the"),
        (["--loops", "2", "--lora-rank", "big"], "--lora-rank must be an integer >= 0 or 'full', got 'big'"),
        (["--loops", "2", "--lora-targets", "q,zz"], "unknown projection 'zz'"),
    ],
)
def test_bad_values_exit_2_with_one_line(src, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), *extra, "--quiet"]) == 2
    assert message in _error_line(capsys)
    assert not out.exists()


def test_unknown_init_is_refused_by_the_parser(src, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(src), str(tmp_path / "out"), "--loops", "2", "--init", "middle"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'middle' (choose from 'stepwise', 'average', 'lower')" in capsys.readouterr().err


def test_unsupported_architecture(tmp_path, capsys):
    BertConfig(num_hidden_layers=4).save_pretrained(tmp_path / "bert")
    assert main(["convert", str(tmp_path / "bert"), str(tmp_path / "out"), "--loops", "2"]) == 2
    assert "unsupported architecture 'bert'" in _error_line(capsys)


def test_missing_src(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--loops", "2"]) == 2
    assert f"SRC '{tmp_path / 'nope'}' does not exist" in _error_line(capsys)


def test_out_not_writable(src, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["convert", str(src), str(blocker / "out"), "--loops", "2"]) == 2
    assert "is not writable" in _error_line(capsys)


def test_existing_out_needs_overwrite(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(src), str(out), "--loops", "2", "--quiet"]) == 2
    assert "pass --overwrite" in _error_line(capsys)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_failure_midway_leaves_nothing_at_out(src, tmp_path, monkeypatch):
    import rrt_ray.convert.convert as convert_module
    import rrt_ray.convert.lora_init as lora_init_module

    calls = {"n": 0}
    real = lora_init_module.truncated_svd

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 10:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_init_module, "truncated_svd", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_module.convert_checkpoint(str(src), str(tmp_path / "out"), loops=2, lora_rank=4, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary sibling


def test_lora_rank_is_clipped_to_each_projections_full_rank_under_gqa(src, tmp_path, capsys):
    """Tiny Llama: hidden 48, 2 of 4 KV heads, so k/v are 24x48 (full rank 24) while q/o/MLP allow 48."""
    assert main(["convert", str(src), str(tmp_path / "out"), "--loops", "2", "--lora-rank", "32", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "k_proj=24" in printed and "v_proj=24" in printed and "q_proj=32" in printed and "down_proj=32" in printed
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.lora_rank == {
        "q_proj": 32, "k_proj": 24, "v_proj": 24, "o_proj": 32, "gate_proj": 32, "up_proj": 32, "down_proj": 32,
    }  # fmt: skip
    original = AutoModelForCausalLM.from_pretrained(src)
    tied = model.config.num_shared_layers  # CYCLE: depth b of shared layer 0 is original layer b * K
    k_proj = model.unrolled_layers.shared[0].self_attn.k_proj
    for depth in range(2):  # clipped to full rank, so exact: W' + B A == W_l
        want = original.model.layers[depth * tied].self_attn.k_proj.weight
        torch.testing.assert_close(k_proj.merged_weight(depth), want, rtol=1e-5, atol=1e-5)
    capsys.readouterr()  # drop the loaders' progress bars
    assert main(["convert", str(src), str(tmp_path / "too-big"), "--loops", "2", "--lora-rank", "49", "--quiet"]) == 2
    line = _error_line(capsys)
    assert "--lora-rank 49 is larger than the full rank of every targeted projection" in line and "use at most 48" in line
