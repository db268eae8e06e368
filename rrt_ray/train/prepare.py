"""Checks and preparation on the driver, before any Ray worker starts.

Everything a user can get wrong (a missing data path, an s3:// URI without credentials, a student that is
not a converted model, a teacher that does not exist) fails here with one clear ValueError. The student is
then made: the given converted model, or the teacher converted with the config's options into a local
folder cached by the teacher's files and the options.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rrt_ray.convert.source import looks_like_hub_id
from rrt_ray.train.config import TrainConfig

CONVERTED_MODEL_TYPE = "rrt_recursive"


def check_data_source(source: str) -> None:
    """Fail before any worker starts when a local data.source names nothing `load_texts` could read
    (the same rules: `rrt_ray.data.corpus.looks_local` and `local_files`, globs included)."""
    from rrt_ray import storage
    from rrt_ray.data.corpus import local_files, looks_local

    from rrt_ray.data.token_sets import resolve_token_set

    if source == "default" or resolve_token_set(source) is not None or storage.is_remote(source) or not looks_local(source):
        return
    try:
        local_files(source)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"data.source: {err}") from None


def resolve_model(uri: str, key: str) -> str:
    """model_source.resolve_model's directory or published root, plus what training also takes: a GGUF file
    (imported once into a content-keyed cache) and, online, a hub id. s3:// URIs pass through unresolved
    (the converter and the workers download them). Errors are ValueErrors that name the config key."""
    from rrt_ray import storage
    from rrt_ray.convert.gguf_import import is_gguf, resolve_model_path
    from rrt_ray.model_source import ModelError, resolve_model as resolve_source

    if storage.is_remote(uri):
        return uri
    if is_gguf(uri):
        return resolve_model_path(uri, log=print)
    online = os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True")
    if not Path(uri).expanduser().exists() and looks_like_hub_id(uri) and online:
        return uri  # fetched by the converter
    try:
        return resolve_source(uri).path
    except ModelError as error:
        raise ValueError(f"{key}: {error}") from None


def check_converted(model_dir: str, key: str = "model.student") -> None:
    """Raise unless model_dir holds a converted recursive model (config.json model_type rrt_recursive)."""
    from rrt_ray import storage

    try:
        model_type = json.loads(storage.read_text(storage.join(model_dir, "config.json"))).get("model_type")
    except FileNotFoundError:
        raise ValueError(f"{key} {model_dir!r} has no config.json: not a Hugging Face model directory") from None
    if model_type != CONVERTED_MODEL_TYPE:
        raise ValueError(
            f"{key} {model_dir!r} is not a converted recursive model (model_type {model_type!r}, expected "
            f"{CONVERTED_MODEL_TYPE!r}); convert it with `rrt convert` or set model.teacher and leave model.student empty"
        )


def preflight(cfg: TrainConfig) -> TrainConfig:
    """Validate paths and credentials; return a copy of cfg with the teacher and student resolved."""
    from rrt_ray import storage

    for key, uri in (
        ("data.source", cfg.data.source),
        ("model.student", cfg.model.student),
        ("model.teacher", cfg.model.teacher),
        ("run.storage", cfg.run.storage),
        ("run.output", cfg.run.output),
    ):
        if uri and storage.is_remote(uri):
            storage.check_s3_access(uri)
    check_data_source(cfg.data.source)
    _check_token_set_options(cfg)
    data = cfg.to_dict()
    if cfg.model.teacher:
        data["model"]["teacher"] = resolve_model(cfg.model.teacher, "model.teacher")
    if cfg.model.student:
        data["model"]["student"] = resolve_model(cfg.model.student, "model.student")
        check_converted(data["model"]["student"])
    return TrainConfig.from_dict(data)


def _check_token_set_options(cfg: TrainConfig) -> None:
    from rrt_ray.data.token_sets import SPLITS, resolve_token_set

    if resolve_token_set(cfg.data.source) is None:
        return
    if cfg.data.max_bytes is not None:
        raise ValueError(f"data.max_bytes={cfg.data.max_bytes} cuts text sources; data.source {cfg.data.source!r} is a token set, used whole (set data.max_bytes=null)")
    for key, split in (("data.train_split", cfg.data.train_split), ("data.eval_split", cfg.data.eval_split)):
        if split not in SPLITS:
            raise ValueError(f"{key} {split!r}: a token set has the splits {', '.join(SPLITS)}")


def _teacher_fingerprint(teacher: str) -> str:
    path = Path(teacher)
    if not path.is_dir():
        return teacher
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    return json.dumps([str(path.resolve()), files])


def convert_teacher(cfg: TrainConfig, log=print) -> str:
    """The converted student for cfg (converting the teacher once per teacher files + options)."""
    from rrt_ray.convert import convert_checkpoint

    model = cfg.model
    options = {"loops": model.loops, "sharing": model.sharing, "init": model.init, "lora_rank": model.lora_rank, "lora_init": model.lora_init}
    if model.calibrate:  # the training split of the default corpus, as `rrt convert --calibrate N` (never the held-out one)
        options["calibration"] = {"sequences": model.calibrate}
    key = hashlib.sha256((_teacher_fingerprint(model.teacher) + json.dumps(options, sort_keys=True)).encode()).hexdigest()[:16]
    out = Path(cfg.run.workdir).expanduser().resolve() / f"converted-{key}"
    if (out / "config.json").is_file():
        log(f"using the converted model cached at {out}")
        return str(out)
    log(f"converting {model.teacher} -> {out} ({options})")
    convert_checkpoint(model.teacher, str(out), progress=False, **options)
    return str(out)


def warm_token_cache(cfg: TrainConfig) -> None:
    """Tokenise the corpus once on the driver, so that the workers of this node find it cached
    instead of all tokenising it at the same time."""
    from transformers import AutoTokenizer

    from rrt_ray import storage
    from rrt_ray.train.data_prep import token_arrays

    if cfg.model.student and not storage.is_remote(cfg.model.student):
        token_arrays(cfg.data, AutoTokenizer.from_pretrained(cfg.model.student))
