"""Serve a (recursive or plain) model with the OpenAI completions API on Ray Serve.

    python jobs/serve.py --model DIR|ROOT|s3://... [--port 8000] [--num-replicas N] [engine.kv_fill=share ...]
    ray job submit --working-dir . -- python jobs/serve.py --model s3://bucket/models/rrt --host 0.0.0.0 --address auto

--model is a model directory, a published root (its "latest" marker names the model) or an s3:// URI of
either. The model is checked here before any replica starts: a bad one exits 2 with one line. Binds
127.0.0.1 unless --host says otherwise. Without --address it starts a private local Ray cluster and stops
it on exit. Waits until /healthz answers, prints the base URL, and serves until SIGINT or SIGTERM (either
stops it within seconds, startup included). Set the API key in the environment variable named by
server.api_key_env (default RRT_API_KEY) to require `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory, published root or s3:// URI")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-replicas", type=int, default=None, help="model deployment replicas (default 1)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved per model replica (<= 0.5 on 2 CPUs)")
    parser.add_argument("--name", default=None, help="model id served (default: the directory name)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for /healthz")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: $RAY_ADDRESS, else a private local one)")
    parser.add_argument("overrides", nargs="*", help="engine.* / server.* settings, e.g. engine.max_num_seqs=8")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the slow imports: either signal interrupts them
        signal.signal(sig, signal.default_int_handler)
    args = parse_args(argv)
    from rrt_ray.serve.launch import ServeLauncher, Stopped, install_stop_handlers

    install_stop_handlers()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        config = build_config(args)
        if config is None:
            return 2
        with ServeLauncher(config, args.host, args.port, args.address or os.environ.get("RAY_ADDRESS")) as launcher:
            try:
                launcher.start(args.timeout)
            except TimeoutError as err:
                print(f"serve: error: {err}", file=sys.stderr)
                return 1
            except Exception as err:  # noqa: BLE001  (Ray failing to start, e.g. its GCS timing out on a loaded machine)
                print(f"serve: error: Ray or the Serve app did not start: {type(err).__name__}: {' '.join(str(err).split())[:300]}", file=sys.stderr)
                return 1
            print(f"serve: {config.model_name} ready at {launcher.url}/v1 (loops: see {launcher.url}/v1/models)", flush=True)
            launcher.wait()
    except (Stopped, KeyboardInterrupt) as stop:
        print(f"serve: stopped ({getattr(stop, 'signum', 'interrupt')})", file=sys.stderr, flush=True)
        return 0
    return 0


def build_config(args):
    """The typed config with the model checked (one line and None when anything is wrong)."""
    from rrt_ray.model_source import ModelError, check_model, fetch_model, resolve_model
    from rrt_ray.serve.app import ServeAppConfig

    given = {"num_replicas": args.num_replicas, "num_cpus": args.num_cpus}
    try:
        overrides = dict(_split(item) for item in args.overrides)
        config = ServeAppConfig.from_args({
            "model": args.model, "model_name": args.name,
            **{k: v for k, v in given.items() if v is not None}, **overrides,
        })
        source = resolve_model(args.model)
        check_model(fetch_model(source), args.model)
    except (ModelError, ValueError) as err:
        print(f"serve: error: {err}", file=sys.stderr)
        return None
    return config


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. engine.max_num_seqs=8)")
    key, value = item.split("=", 1)
    return key, value


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything we started is stopped by now; Ray's own atexit hook could still block on the GCS we
    # stopped (seen for 15-40 s under load), so leave without running it.
    os._exit(code)
