"""`rrt eval`: the local next-line task (built from the held-out split) and lm-eval's in-process run."""

import json

import pytest

from rrt_ray import data
from rrt_ray.lm_eval_task import CHOICES, CONTEXT_LINES, next_line_docs


def test_next_line_docs_are_seeded_and_hold_the_true_next_line():
    docs = next_line_docs(20, seed=3)
    assert docs == next_line_docs(20, seed=3) and docs != next_line_docs(20, seed=4)
    heldout = "\n".join(data.load_texts("default", "heldout"))
    for doc in docs:
        assert len(doc["choices"]) == CHOICES and len(set(doc["choices"])) == CHOICES
        assert doc["context"].count("\n") == CONTEXT_LINES
        assert doc["context"] + doc["choices"][doc["label"]] in heldout or doc["choices"][doc["label"]] in heldout
    assert len({doc["label"] for doc in docs}) > 1  # the answer is not always in one slot


@pytest.mark.slow  # lm-eval import and run: minutes on a loaded 2-core machine
def test_rrt_eval_runs_lm_eval_in_process(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from rrt_ray.cli import main
    from rrt_ray.testing import VOCAB, tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tok = Tokenizer(models.BPE(vocab={chr(33 + i): i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(tmp_path / "m")
    assert main(["eval", str(tmp_path / "m"), "--docs", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["docs"] == 8 and 0 <= result["acc"] <= 1 and (result["acc"] * 8).is_integer()
