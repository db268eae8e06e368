"""Serve a (recursive) model with the OpenAI completions API on Ray Serve.

    python jobs/serve.py --model DIR|s3://... [--port 8000] [--host 127.0.0.1] [engine.kv_fill=share ...]
    ray job submit --working-dir . -- python jobs/serve.py --model s3://bucket/models/rrt --host 0.0.0.0

Binds 127.0.0.1 unless --host says otherwise. Waits until /healthz answers, prints the base URL, and
serves until interrupted. Set the API key in the environment variable named by server.api_key_env
(default RRT_API_KEY) to require `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import urllib.request



def wait_healthy(url: str, timeout_s: float) -> None:
    """Port 8000 accepts before the replica is ready: poll /healthz with short timeouts."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory or s3:// URI")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica (<= 1 on 2 CPUs)")
    parser.add_argument("--name", default=None, help="model id served (default: the directory name)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for /healthz")
    parser.add_argument("--address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else a new local one)")
    parser.add_argument("overrides", nargs="*", help="engine.* / server.* settings, e.g. engine.max_num_seqs=8")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from rrt_ray.serve.app import ServeAppConfig, build_application

    try:
        overrides = dict(item.split("=", 1) for item in args.overrides)
        config = ServeAppConfig.from_args({"model": args.model, "model_name": args.name, "num_cpus": args.num_cpus, **overrides})
    except ValueError as err:
        print(f"serve: error: {err}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_application(config), name="rrt", route_prefix="/", blocking=False)
    url = f"http://{args.host}:{args.port}"
    try:
        wait_healthy(url, args.timeout)
    except TimeoutError as err:
        print(f"serve: error: {err}", file=sys.stderr)
        serve.shutdown()
        return 1
    print(f"serve: {config.model_name} ready at {url}/v1 (loops: see {url}/v1/models)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a background job ignores SIGINT: SIGTERM stops it too
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
