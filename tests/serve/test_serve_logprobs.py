"""logprobs, echo, n and the rrt fields over real HTTP (uvicorn on 127.0.0.1, no Ray), read by the official
openai client where it matters: what lm-evaluation-harness's local-completions model needs."""

from __future__ import annotations

import pytest
import requests
import torch
from serve_helpers import load, save_word_tokenizer
from test_serve_http import LocalServer

from rrt_ray.serve.engine import Engine, EngineConfig
from rrt_ray.serve.sampling import SamplingParams

PROMPT_IDS = [10, 11, 12, 13, 40, 7, 99]


@pytest.fixture(scope="module")
def server(model_dirs):
    save_word_tokenizer(model_dirs[3], chat=True)
    s = LocalServer(model_dirs[3], max_n=4)
    yield s
    s.close()


def post(server, path, body):
    return requests.post(f"{server.url}{path}", json=body, timeout=180)  # the first request warms the engine up


def hf_prompt_logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 from a plain Hugging Face forward: (len(ids) - 1,)."""
    with torch.no_grad():
        logits = load(model_dir)(torch.tensor([ids])).logits[0].float()  # (T, V)
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("max_tokens", [0, 1, 3])
@pytest.mark.parametrize("max_batch_tokens", [64, 3], ids=["one_chunk", "chunked"])
def test_engine_scores_the_prompt_at_full_depth_even_when_tokens_exit_early(model_dirs, max_tokens, max_batch_tokens):
    """Echo under the lossy exit: a threshold of 0 exits every generated token after loop 1, yet the
    request finishes only once every prompt row ran all loops (a max_tokens-1 request used to finish with
    rows still in flight; a max_tokens-0 one never finished: issue 13's echo hang)."""
    engine = Engine(load(model_dirs[3]), config=EngineConfig(max_num_seqs=4, max_batch_tokens=max_batch_tokens, max_model_len=64))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=1, prompt_logprobs=2, exit_threshold=0.0, ignore_eos=True)
    other = SamplingParams(max_tokens=4, temperature=0, exit_threshold=0.0)  # shares the steps, no echo
    echo_id, _ = engine.add_request(PROMPT_IDS, params), engine.add_request(PROMPT_IDS[:3], other)
    final = {}
    for _ in range(50):  # bounded: a request that never finishes fails here instead of hanging the suite
        final.update({o.request_id: o for o in engine.step() if o.finished})
    out = final[echo_id]
    assert out.finish_reason == "length" and len(out.token_ids) == max_tokens and not engine.has_unfinished()
    # the first token comes from the prompt's last row, which a scored prompt runs to full depth; the others exit early
    assert out.exit_loops == ([3] + [1] * (max_tokens - 1) if max_tokens else [])
    assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), hf_prompt_logprobs(model_dirs[3], PROMPT_IDS), rtol=0, atol=1e-4)
    assert all(len(top) == 2 for top in out.prompt_top_logprobs[1:])


def test_echo_prompt_logprobs_equal_a_plain_hf_forward(server, model_dirs):
    """lm-eval's loglikelihood request: token ids, max_tokens 1, logprobs 1, echo true (and max_tokens 0)."""
    expected = hf_prompt_logprobs(model_dirs[3], PROMPT_IDS)
    for max_tokens in (1, 0):
        r = post(server, "/v1/completions", {"prompt": [PROMPT_IDS], "max_tokens": max_tokens, "logprobs": 1, "echo": True, "temperature": 0})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        n = len(PROMPT_IDS)
        assert len(lp["tokens"]) == n + max_tokens and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:n]), expected, rtol=0, atol=1e-4)
        for top, chosen in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]):
            assert len(top) == 1 and max(top.values()) >= chosen - 1e-6
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0


def test_the_openai_client_sends_lm_evals_loglikelihood_batch(server, model_dirs):
    """What lm-eval's local-completions model sends for loglikelihood: a batch of token-id lists, max_tokens 1,
    logprobs 1, echo true, temperature 0; one choice per prompt, in order, each with its prompt's log-probs."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=180)
    batch = [PROMPT_IDS, PROMPT_IDS[2:], [5, 6, 7, 8]]
    out = client.completions.create(model="tiny", prompt=batch, max_tokens=1, logprobs=1, echo=True, temperature=0, seed=1234)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for ids, choice in zip(batch, out.choices):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1 : len(ids)]), hf_prompt_logprobs(model_dirs[3], ids), rtol=0, atol=1e-4)


def test_the_openai_client_reads_logprobs_and_n_choices(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="tiny", prompt="w10 w11 w12", max_tokens=5, logprobs=3, temperature=1.0, seed=7, n=3, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    for c in out.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
        for top, chosen, token in zip(lp.top_logprobs, lp.token_logprobs, lp.tokens):
            values = list(top.values())
            assert len(values) == 3 and values == sorted(values, reverse=True)
            if chosen >= values[-1]:
                assert token in top
    again = client.completions.create(model="tiny", prompt="w10 w11 w12", max_tokens=5, temperature=1.0, seed=7, n=3)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # reproducible with a seed
    assert len({c.text for c in out.choices}) > 1  # and independent
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w10 w11"}], max_tokens=4, logprobs=True, top_logprobs=2, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) > 0 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-6)  # greedy: the top one


def test_streamed_logprobs_concatenate_to_the_non_streamed_ones(server):
    """Each chunk carries its new tokens' log-probs (legacy format, text offsets running on across chunks;
    chat's content list); over a stream they add up to the non-streamed answer, choice by choice."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=180)
    body = dict(model="tiny", prompt="w10 w11 w12", max_tokens=6, logprobs=2, temperature=1.0, seed=3, n=2, extra_body={"ignore_eos": True})
    whole = client.completions.create(**body)
    parts = {i: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for i in range(2)}
    chunks = 0
    for chunk in client.completions.create(**body, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None:
                chunks += 1
                for key, values in parts[c.index].items():
                    values += getattr(c.logprobs, key)
    assert chunks >= 2 * 6 // 2  # streamed piece by piece, not in one final chunk
    for c in whole.choices:
        assert parts[c.index] == {key: getattr(c.logprobs, key) for key in parts[c.index]}
    chat = dict(model="tiny", messages=[{"role": "user", "content": "w10 w11"}], max_tokens=5, logprobs=True, top_logprobs=2, temperature=0)
    whole_chat = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [e for chunk in client.chat.completions.create(**chat, stream=True) for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole_chat] and len(streamed) > 0


def test_speculative_mode_over_http_equals_full_depth(server):
    body = {"prompt": "w10 w11 w12 w13", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = post(server, "/v1/completions", {**body, "exit_mode": "none"}).json()["choices"][0]
    spec = post(server, "/v1/completions", {**body, "exit_mode": "speculative", "draft_tokens": 3}).json()["choices"][0]
    assert spec["text"] == full["text"] and spec["drafted_tokens"] > 0


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"n": 5}, "n"),
    ("/v1/completions", {"draft_tokens": 0}, "draft_tokens"),
    ("/v1/completions", {"exit_mode": "sometimes"}, "exit_mode"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"echo": True, "logprobs": 1, "stream": True}, "echo"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"top_logprobs": 25, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
])
def test_bad_values_are_a_400_naming_the_field(server, path, body, field):
    base = {"prompt": "w10 w11"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "w10"}]}
    r = post(server, path, {**base, "max_tokens": 3, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"]
    ok = post(server, "/v1/completions", {"prompt": "w10 w11", "max_tokens": 2})  # nothing else disturbed
    assert ok.status_code == 200
