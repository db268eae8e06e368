"""The Serve app (ingress + model deployments) on a private local Ray cluster, over real HTTP on 127.0.0.1.

One app is shared by the module; the replica-kill test comes last and scales the model deployment to 2.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from serve_helpers import metric_value, parse_sse, save_word_tokenizer, wait_healthy

from rrt_ray.serve.app import ServeAppConfig, app_builder, build_application
from rrt_ray.serve.launch import OWNER_ENV, owned_processes

REPO = Path(__file__).resolve().parents[2]
KEY_ENV = "RRT_SERVE_TEST_KEY"
KEY = "test-key-123"
PROMPT = "w10 w11 w12 w13"
APP = "rrt-test"


def test_serve_deploy_config_is_valid_and_builds():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "infra/serve/rrt_serve.yaml").read_text())
    [app] = ServeDeploySchema.model_validate(config).applications
    assert app.import_path == "rrt_ray.serve.app:app_builder"
    assert config["http_options"]["host"] == "127.0.0.1"
    parsed = ServeAppConfig.from_args(app.args)
    assert parsed.engine.kv_fill == "propagate" and parsed.server.model_name == "rrt-demo"
    ingress = app_builder(app.args)._bound_deployment  # the Application, built without starting Ray
    assert ingress.name == "CompletionIngress" and ingress.ray_actor_options["num_cpus"] == parsed.ingress_num_cpus
    config_arg, model_app = ingress.init_args
    assert ServeAppConfig(**config_arg) == parsed  # the replicas rebuild exactly the parsed config
    model = model_app._bound_deployment
    assert model.name == "ModelServer" and model.num_replicas == parsed.num_replicas == 2
    assert model.ray_actor_options["num_cpus"] == parsed.num_cpus
    assert model.max_ongoing_requests == parsed.server.max_concurrent_requests + 16
    assert ServeAppConfig(**model.init_args[0]) == parsed


def test_cli_style_args_are_typed():
    config = ServeAppConfig.from_args({
        "model": "/m/demo", "engine.max_num_seqs": "8", "server.default_exit_threshold": "0.9", "num_cpus": "0.5", "num_replicas": "3",
    })
    assert config.engine.max_num_seqs == 8 and config.server.default_exit_threshold == 0.9 and config.num_cpus == 0.5
    assert config.num_replicas == 3 and config.model_name == "demo"
    with pytest.raises(ValueError, match="unknown EngineConfig field"):
        ServeAppConfig.from_args({"model": "/m", "engine.nope": "1"})
    with pytest.raises(ValueError, match="kv_fill"):
        ServeAppConfig.from_args({"model": "/m", "engine.kv_fill": "zeros"})
    with pytest.raises(ValueError, match="num_replicas"):
        ServeAppConfig.from_args({"model": "/m", "num_replicas": "0"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(model_dir, num_replicas: int = 1) -> ServeAppConfig:
    return ServeAppConfig.from_args({
        "model": str(model_dir), "model_name": "tiny", "num_cpus": 0.5, "ingress_num_cpus": 0.25, "num_replicas": num_replicas,
        "engine": {"max_num_seqs": 8, "max_batch_tokens": 64, "max_model_len": 128},
        "server": {"max_prompt_tokens": 64, "max_tokens_limit": 48, "max_concurrent_requests": 32, "api_key_env": KEY_ENV},
    })


class ServeApp:
    def __init__(self, url: str, temp_dir: str, owner: str, model_dir) -> None:
        self.url, self.temp_dir, self.owner, self.model_dir = url, temp_dir, owner, model_dir

    def log_lines(self) -> list[str]:
        """Every line of the Serve logs (controller, proxy, replicas) and of the workers' stderr."""
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        files = list((logs / "serve").glob("*.log")) + list(logs.glob("worker-*.err"))
        return [line for f in files for line in f.read_text(errors="replace").splitlines()]


@pytest.fixture(scope="module")
def serve_app(model_dirs):
    import ray
    from ray import serve

    save_word_tokenizer(model_dirs[3], chat=True)
    owner = f"test-{os.getpid()}-{time.time_ns()}"
    saved = {k: os.environ.get(k) for k in (KEY_ENV, OWNER_ENV)}
    os.environ.update({KEY_ENV: KEY, OWNER_ENV: owner})  # replicas of this local cluster inherit the environment
    temp_dir = tempfile.mkdtemp(prefix="rrt-test-serve-")
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)  # never a shared head
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(_config(model_dirs[3])), name=APP, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        yield ServeApp(url, temp_dir, owner, model_dirs[3])
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(url, body=None, data=None, headers=AUTH, path="/v1/completions", stream=False):
    return requests.post(f"{url}{path}", json=body, data=data, headers={"Content-Type": "application/json", **(headers or {})}, timeout=120, stream=stream)


@pytest.mark.slow
def test_ray_serve_end_to_end(serve_app):
    url = serve_app.url
    r = post(url, {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    plain = r.json()["choices"][0]
    assert plain["exit_loops"] == [3] * len(plain["exit_loops"]) and plain["text"]
    early = post(url, {"prompt": PROMPT, "max_tokens": 6, "exit_threshold": 0.0}).json()["choices"][0]
    assert set(early["exit_loops"]) == {1}
    events = parse_sse(post(url, {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}, stream=True))
    assert "".join(e["choices"][0]["text"] for e in events) == plain["text"]
    chat = post(url, {"messages": [{"role": "user", "content": "w3 w4"}], "max_tokens": 3}, path="/v1/chat/completions")
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    models = requests.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["num_loops"] == 3
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    metrics = requests.get(f"{url}/metrics", timeout=30).text
    assert metric_value(metrics, 'rrt_exit_loops_bucket{le="3.5"}') >= 6 and metric_value(metrics, 'rrt_requests_total{status="ok"}') >= 4


BAD = [
    (None, b'{"prompt": ', AUTH, 400, None),
    ({"prompt": PROMPT, "max_tokens": "ten"}, None, AUTH, 400, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": -5}, None, AUTH, 400, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 10**9}, None, AUTH, 400, "max_tokens"),
    ({"prompt": " ".join(["w9"] * 100)}, None, AUTH, 400, "prompt"),
    ({"prompt": [5, 10**6]}, None, AUTH, 400, "prompt"),  # refused by the engine in the model replica
    ({"prompt": PROMPT, "max_loops": 4}, None, AUTH, 400, "max_loops"),
    (None, b'{"prompt": "\\ud800abc", "max_tokens": 4}', AUTH, 400, "prompt"),
    (None, b'{"prompt": ["w1", "\\ud800abc"], "max_tokens": 4}', AUTH, 400, "prompt"),
    (None, b'{"prompt": "\\udfffabc", "max_tokens": 4, "stream": true}', AUTH, 400, "prompt"),
    ({"model": "other", "prompt": PROMPT}, None, AUTH, 404, "model"),
    ({"prompt": PROMPT}, None, None, 401, None),
    ({"prompt": PROMPT}, None, {"Authorization": "Bearer wrong"}, 401, None),
]


@pytest.mark.slow
def test_ray_serve_bad_requests_get_4xx_json(serve_app):
    for body, raw, headers, status, param in BAD:
        r = post(serve_app.url, body, data=raw, headers=headers)
        assert r.status_code == status, (body, raw, r.text)
        assert r.json()["error"]["message"] and r.json()["error"]["param"] == param, r.text
        assert KEY not in r.text


@pytest.mark.slow
def test_ray_serve_burst_of_good_and_bad_requests(serve_app):
    url = serve_app.url
    good = [({"prompt": PROMPT + f" w{30 + i}", "max_tokens": 3 + i % 6, "temperature": 0}, AUTH) for i in range(20)]
    bad = [({"prompt": PROMPT, "max_tokens": 0}, AUTH), ({"prompt": PROMPT}, {"Authorization": "Bearer x"}), ({"prompt": [1, 10**7]}, AUTH)] * 4
    jobs = [("good", *g) for g in good] + [("bad", *b) for b in bad]
    jobs = [jobs[(5 * i) % len(jobs)] for i in range(len(jobs))]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda job: (job, post(url, job[1], headers=job[2])), jobs))
    for (kind, body, _), r in results:
        if kind == "good":
            assert r.status_code == 200, r.text
            assert 1 <= r.json()["usage"]["completion_tokens"] <= body["max_tokens"]
        else:
            assert 400 <= r.status_code < 500 and r.json()["error"]["message"]
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def _metrics(url: str) -> str:
    return requests.get(f"{url}/metrics", timeout=30).text


def _cut_after_two_events(url: str) -> None:
    r = post(url, {"prompt": PROMPT, "max_tokens": 48, "temperature": 0, "stream": True}, stream=True)
    assert r.status_code == 200
    lines = (line for line in r.iter_lines() if line)
    next(lines), next(lines)
    r.close()  # the client goes away mid-stream


@pytest.mark.slow
def test_ray_serve_client_disconnects_are_cancellations_not_errors(serve_app):
    url = serve_app.url
    before = _metrics(url)
    warnings_before = {line for line in serve_app.log_lines() if _is_warning(line)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda _: _cut_after_two_events(url), range(20)))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the ingress counts a cancellation when Serve tells it the client left
        after = _metrics(url)
        cancelled = metric_value(after, 'rrt_requests_total{status="cancelled"}') - metric_value(before, 'rrt_requests_total{status="cancelled"}')
        if cancelled >= 20 and metric_value(after, "rrt_running_requests") == 0:
            break
        time.sleep(0.5)
    assert cancelled == 20 and metric_value(after, "rrt_running_requests") == 0, after
    assert metric_value(after, 'rrt_requests_total{status="error"}') == metric_value(before, 'rrt_requests_total{status="error"}')
    time.sleep(1.0)  # log files are flushed asynchronously
    new_warnings = [line for line in serve_app.log_lines() if _is_warning(line) and line not in warnings_before]
    assert new_warnings == []


def _is_warning(line: str) -> bool:
    return line.startswith(("WARNING", "ERROR", "CRITICAL")) or "Traceback" in line or "never retrieved" in line


def _model_replica_pids(owner: str) -> list[int]:
    return [p.pid for p in owned_processes(owner) if "ModelServer" in " ".join(p.cmdline())]


def _one_request(url: str, i: int) -> dict:
    """One request of a looping client: what it saw, classified (every body must be JSON)."""
    stream = i % 2 == 0
    body = {"prompt": PROMPT + f" w{20 + i % 30}", "max_tokens": 24, "temperature": 0, "stream": stream}
    r = post(url, body, stream=stream)
    if not stream or r.status_code != 200:
        return {"status": r.status_code, "json": r.json(), "streamed": False, "retry_after": r.headers.get("Retry-After")}
    events, error = [], None
    for line in r.iter_lines(decode_unicode=True):
        if not line:
            continue
        assert line.startswith("data: "), line
        if line == "data: [DONE]":
            break
        event = json.loads(line[len("data: "):])
        if "error" in event:
            error = event
        else:
            events.append(event)
    return {"status": 200 if error is None else "stream-error", "json": error, "streamed": bool(events)}


def _load_while(url: str, action, clients: int = 8, after_s: float = 4.0) -> list[dict]:
    """8 looping clients; `action()` runs once they are busy; they stop `after_s` seconds after it returns and once
    as many requests sent after it as there are clients have succeeded (at most 120 s more: a loaded machine is slow).
    Each outcome says whether its request was sent after the action returned ("after")."""
    stop, results, lock = threading.Event(), [], threading.Lock()
    done_at: list[float] = []

    def client(c: int) -> None:
        i = c
        while not stop.is_set():
            sent = time.monotonic()
            outcome = _one_request(url, i)  # raises (fails the test) on any non-JSON body
            outcome["after"] = bool(done_at) and sent > done_at[0]
            with lock:
                results.append(outcome)
            i += clients

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(client, c) for c in range(clients)]
        time.sleep(2.0)
        action()
        done_at.append(time.monotonic())
        time.sleep(after_s)
        deadline = time.monotonic() + 120
        while sum(r["after"] and r["status"] == 200 for r in list(results)) < clients and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        for f in futures:
            f.result()
    return results


@pytest.mark.slow
def test_ray_serve_killed_model_replica(serve_app):
    """Last in the module: scales the model deployment to 2 replicas and kills them under load."""
    from ray import serve

    serve.run(build_application(_config(serve_app.model_dir, num_replicas=2)), name=APP, route_prefix="/", blocking=False)
    deadline = time.monotonic() + 120
    while len(_model_replica_pids(serve_app.owner)) < 2:
        assert time.monotonic() < deadline, "the second model replica did not start"
        time.sleep(0.5)
    wait_healthy(serve_app.url)
    time.sleep(2.0)  # the router learns about the new replica

    # One of two replicas killed: nothing fails but (at most) streams that had already sent events.
    victim = _model_replica_pids(serve_app.owner)[0]
    results = _load_while(serve_app.url, lambda: os.kill(victim, 9))
    failed = [r for r in results if r["status"] != 200]
    assert all(r["streamed"] for r in failed), failed
    assert sum(r["after"] and r["status"] == 200 for r in results) >= 8, "requests sent after the kill must succeed"  # was a count of all requests: load-dependent
    for r in failed:
        assert r["json"]["error"]["type"] == "server_error" and r["json"]["error"]["code"] == "engine_unavailable"

    # Every replica killed at once: requests retry until replacements come up or get a JSON 503 with Retry-After.
    deadline = time.monotonic() + 120
    while len(_model_replica_pids(serve_app.owner)) < 2:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    results = _load_while(serve_app.url, lambda: [os.kill(pid, 9) for pid in _model_replica_pids(serve_app.owner)], after_s=8.0)
    for r in results:
        if r["status"] == 503:
            assert r["retry_after"] and r["json"]["error"]["message"]
        elif r["status"] != 200:
            assert r["streamed"] and r["json"]["error"]["code"] == "engine_unavailable", r
    wait_healthy(serve_app.url)
    assert post(serve_app.url, {"prompt": PROMPT, "max_tokens": 3}).status_code == 200
