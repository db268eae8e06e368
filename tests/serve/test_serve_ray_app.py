"""The deployment on a local Ray Serve, over real HTTP on 127.0.0.1, and the `serve deploy` config."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from serve_helpers import parse_sse, save_word_tokenizer, wait_healthy

from rrt_ray.serve.app import ServeAppConfig, app_builder, build_application

REPO = Path(__file__).resolve().parents[2]
KEY_ENV = "RRT_SERVE_TEST_KEY"
KEY = "test-key-123"
PROMPT = "w10 w11 w12 w13"


def test_serve_deploy_config_is_valid_and_builds():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "infra/serve/rrt_serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(config)
    [app] = schema.applications
    assert app.import_path == "rrt_ray.serve.app:app_builder"
    assert config["http_options"]["host"] == "127.0.0.1"
    parsed = ServeAppConfig.from_args(app.args)
    assert parsed.engine.kv_fill == "propagate" and parsed.server.model_name == "rrt-demo"
    built = app_builder(app.args)._bound_deployment  # the Application, built without starting Ray
    assert built.name == "CompletionServer" and built.ray_actor_options["num_cpus"] == 1
    assert built.max_ongoing_requests == parsed.server.max_concurrent_requests + 16
    [config_arg] = built.init_args
    assert ServeAppConfig(**config_arg) == parsed  # the replica rebuilds exactly the parsed config


def test_cli_style_args_are_typed():
    config = ServeAppConfig.from_args({"model": "/m/demo", "engine.max_num_seqs": "8", "server.default_exit_threshold": "0.9", "num_cpus": "0.5"})
    assert config.engine.max_num_seqs == 8 and config.server.default_exit_threshold == 0.9 and config.num_cpus == 0.5
    assert config.model_name == "demo"
    with pytest.raises(ValueError, match="unknown EngineConfig field"):
        ServeAppConfig.from_args({"model": "/m", "engine.nope": "1"})
    with pytest.raises(ValueError, match="kv_fill"):
        ServeAppConfig.from_args({"model": "/m", "engine.kv_fill": "zeros"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url(model_dirs):
    import ray
    from ray import serve

    save_word_tokenizer(model_dirs[3], chat=True)
    os.environ[KEY_ENV] = KEY  # replicas of this local cluster inherit the environment
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a shared head
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeAppConfig.from_args({
            "model": str(model_dirs[3]), "model_name": "tiny", "num_cpus": 0.5,
            "engine": {"max_num_seqs": 8, "max_batch_tokens": 64, "max_model_len": 128},
            "server": {"max_prompt_tokens": 64, "max_tokens_limit": 48, "max_concurrent_requests": 32, "api_key_env": KEY_ENV},
        })
        serve.run(build_application(config), name="rrt-test", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(url, body=None, data=None, headers=AUTH, path="/v1/completions", stream=False):
    return requests.post(f"{url}{path}", json=body, data=data, headers={"Content-Type": "application/json", **(headers or {})}, timeout=120, stream=stream)


@pytest.mark.slow
def test_ray_serve_end_to_end(serve_url):
    # completions, with the rrt extensions
    r = post(serve_url, {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    plain = r.json()["choices"][0]
    assert plain["exit_loops"] == [3] * len(plain["exit_loops"]) and plain["text"]
    early = post(serve_url, {"prompt": PROMPT, "max_tokens": 6, "exit_threshold": 0.0}).json()["choices"][0]
    assert set(early["exit_loops"]) == {1}
    # streaming
    events = parse_sse(post(serve_url, {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}, stream=True))
    assert "".join(e["choices"][0]["text"] for e in events) == plain["text"]
    # chat, models, health, metrics
    chat = post(serve_url, {"messages": [{"role": "user", "content": "w3 w4"}], "max_tokens": 3}, path="/v1/chat/completions")
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    models = requests.get(f"{serve_url}/v1/models", headers=AUTH, timeout=30).json()
    assert models["data"][0]["id"] == "tiny"
    assert requests.get(f"{serve_url}/healthz", timeout=30).status_code == 200
    metrics = requests.get(f"{serve_url}/metrics", timeout=30).text
    assert "rrt_exit_loops_bucket" in metrics and "rrt_generated_tokens_total" in metrics and "rrt_queue_length" in metrics


BAD = [
    (None, b'{"prompt": ', AUTH, 400),
    ({"prompt": PROMPT, "max_tokens": "ten"}, None, AUTH, 400),
    ({"prompt": PROMPT, "max_tokens": -5}, None, AUTH, 400),
    ({"prompt": PROMPT, "max_tokens": 10**9}, None, AUTH, 400),
    ({"prompt": " ".join(["w9"] * 100)}, None, AUTH, 400),
    ({"model": "other", "prompt": PROMPT}, None, AUTH, 404),
    ({"prompt": PROMPT}, None, None, 401),
    ({"prompt": PROMPT}, None, {"Authorization": "Bearer wrong"}, 401),
]


@pytest.mark.slow
def test_ray_serve_bad_requests_get_4xx_json(serve_url):
    for body, raw, headers, status in BAD:
        r = post(serve_url, body, data=raw, headers=headers)
        assert r.status_code == status, (body, raw, r.text)
        assert r.json()["error"]["message"]
        assert KEY not in r.text


@pytest.mark.slow
def test_ray_serve_burst_of_good_and_bad_requests(serve_url):
    good = [({"prompt": PROMPT + f" w{30 + i}", "max_tokens": 3 + i % 6, "temperature": 0}, AUTH) for i in range(20)]
    bad = [({"prompt": PROMPT, "max_tokens": 0}, AUTH), ({"prompt": PROMPT}, {"Authorization": "Bearer x"}), ({"prompt": [1, 10**7]}, AUTH)] * 4
    jobs = [("good", *g) for g in good] + [("bad", *b) for b in bad]
    jobs = [jobs[(5 * i) % len(jobs)] for i in range(len(jobs))]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda job: (job, post(serve_url, job[1], headers=job[2])), jobs))
    for (kind, body, _), r in results:
        if kind == "good":
            assert r.status_code == 200, r.text
            assert 1 <= r.json()["usage"]["completion_tokens"] <= body["max_tokens"]
        else:
            assert 400 <= r.status_code < 500 and r.json()["error"]["message"]
    assert requests.get(f"{serve_url}/healthz", timeout=30).status_code == 200
