"""infra/ manifests against the KubeRay CRD schemas (shared/kuberay-crds), strictly.

CRD schemas rarely forbid unknown fields, so plain JSON-schema validation would accept a misspelled
key; `unknown_fields` walks the schema as `kubectl apply --validate=strict` does.
"""

import copy
import functools
import os
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = Path(os.environ.get("RRT_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
MANIFESTS = sorted((ROOT / "infra" / "kuberay").glob("*.yaml"))


@functools.cache
def _schemas() -> dict[str, dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 60k lines
    schemas = {}
    for file in CRDS.glob("ray.io_*.yaml"):
        crd = yaml.load(file.read_text(), Loader=loader)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


def _schema(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS} (shared/ sits beside the clone in CI)")
    return _schemas()[kind]


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key in schema["properties"]:
                found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
            elif not schema.get("additionalProperties"):
                found.append(f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            found += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            found += unknown_fields(value, schema["items"], f"{path}[{i}]")
    return found


def _check(manifest: dict) -> list[str]:
    schema = _schema(manifest["kind"])
    jsonschema.validate(manifest, schema)
    return unknown_fields(manifest, schema)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_crd_strictly(path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    assert _check(manifest) == []


def test_the_strict_check_catches_a_misspelled_field():
    manifest = yaml.safe_load((ROOT / "infra/kuberay/rayjob-uptrain.yaml").read_text())
    bad = copy.deepcopy(manifest)
    bad["spec"]["entrypointt"] = bad["spec"].pop("entrypoint")
    assert _check(bad) == [".spec.entrypointt"]
    bad = copy.deepcopy(manifest)
    bad["spec"]["backoffLimit"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        _check(bad)


def test_rayjob_entrypoint_runs_a_job_and_config_of_this_repo():
    manifest = yaml.safe_load((ROOT / "infra/kuberay/rayjob-uptrain.yaml").read_text())
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file()
    assert (ROOT / argv[argv.index("--config") + 1]).is_file()


def test_tokenize_rayjob_arguments_parse_with_the_jobs_own_parser():
    import importlib.util

    manifest = yaml.safe_load((ROOT / "infra/kuberay/rayjob-tokenize.yaml").read_text())
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/tokenize_corpus.py"]
    spec = importlib.util.spec_from_file_location("rrt_job_tokenize_corpus", ROOT / argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(argv[2:])  # an unknown or missing flag exits here
    assert args.source.startswith("s3://") and args.out.startswith("s3://") and args.workers >= 1
    bad = copy.deepcopy(manifest)
    del bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    with pytest.raises(jsonschema.ValidationError):
        _check(bad)


def test_every_image_is_the_project_image_and_ray_version_matches_the_pin():
    pinned = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"ray[' in line)
    for path in MANIFESTS:
        text = path.read_text()
        manifest = yaml.safe_load(text)
        spec = manifest["spec"].get("rayClusterSpec", manifest["spec"].get("rayClusterConfig", manifest["spec"]))
        assert spec["rayVersion"] in pinned, path.name
        images = [line.split("image:")[1].strip() for line in text.splitlines() if "image:" in line]
        assert images and all(image == "rrt-ray:0.1.0" for image in images), path.name


def test_ray_up_config_and_runtime_env_parse():
    cluster = yaml.safe_load((ROOT / "infra/cluster.yaml").read_text())
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert {"cluster_name", "provider", "max_workers"} <= cluster.keys()
    runtime_env = yaml.safe_load((ROOT / "infra/runtime_env.yaml").read_text())
    assert set(runtime_env) <= {"env_vars", "excludes", "working_dir", "pip", "py_modules"}
    assert not any("AWS_" in key for key in runtime_env["env_vars"])  # credentials never in manifests


def test_rayservice_runs_this_repos_serve_app_with_the_model_from_s3_and_the_key_from_a_secret():
    from ray.serve.schema import ServeDeploySchema

    from rrt_ray.serve.app import ServeAppConfig, app_builder

    manifest = yaml.safe_load((ROOT / "infra/kuberay/rayservice-serve.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    [app] = ServeDeploySchema.model_validate(serve_config).applications
    assert app.import_path == "rrt_ray.serve.app:app_builder"
    config = ServeAppConfig.from_args(app.args)  # the app's own validation
    app_builder(app.args)
    assert config.model.startswith("s3://") and config.num_gpus >= 1 and config.num_replicas >= 2
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in w["template"]["spec"]["containers"][0]["resources"]["limits"] for w in workers)
    pods = [manifest["spec"]["rayClusterConfig"]["headGroupSpec"]] + workers
    for pod in pods:  # every node may run the ingress: each has the key, from a Secret, never inline
        [key] = [e for e in pod["template"]["spec"]["containers"][0]["env"] if e["name"] == config.server.api_key_env]
        assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"]
    assert "AWS_SECRET" not in manifest["spec"]["serveConfigV2"]


@pytest.mark.parametrize("path", [
    ("spec", "rayClusterConfig"),
    ("spec", "rayClusterConfig", "headGroupSpec"),
    ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "groupName"),
    ("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0, "name"),
], ids=lambda p: ".".join(map(str, p)))
def test_rayservice_without_a_required_field_fails(path):
    manifest = yaml.safe_load((ROOT / "infra/kuberay/rayservice-serve.yaml").read_text())
    assert _check(manifest) == []
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(jsonschema.ValidationError):
        _check(manifest)


def test_tune_rayjob_runs_a_valid_sweep_of_this_repo_with_the_dashboard_on():
    from rrt_ray.tune.config import TuneConfig
    from rrt_ray.tune.space import check_space

    manifest = yaml.safe_load((ROOT / "infra/kuberay/rayjob-tune.yaml").read_text())
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/tune.py"]
    config = argv[argv.index("--config") + 1]
    overrides = argv[argv.index("--config") + 2:]
    cfg = TuneConfig.load(ROOT / config, overrides)  # the overrides name real keys
    check_space(cfg)  # and the space is valid (no path is read)
    assert all(uri.startswith("s3://") for uri in (cfg.sweep.storage, cfg.sweep.output, cfg.train["model"]["teacher"]))
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert head.get("include-dashboard", "true") != "false"  # Tune over Ray Train hangs without it
