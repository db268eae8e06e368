"""Import a GGUF file (llama.cpp's format) into a plain Hugging Face model directory.

    rrt import model.gguf OUT [--dtype float32|bfloat16]
    rrt convert model.gguf OUT ...      (through `resolve_model_path`, cached by content)

transformers reads GGUF itself (the `gguf` package parses and dequantizes every tensor type, undoing
llama.cpp's q/k rotary permutation and Gemma's `1 + w` norms), but a model loaded that way carries a GGUF
quantization config and refuses `save_pretrained`. So the import is:
    1. read the header with `gguf.GGUFReader` (a truncated or foreign file fails here, in one line);
    2. build the config from its metadata and check that rrt-ray can loop that family;
    3. load the dequantized weights with transformers, and refuse any parameter the file did not set
       (transformers silently skips unknown GGUF tensors and leaves the parameter at its random init);
    4. move them into a plain model built from the config without `quantization_config`;
    5. write safetensors, config, generation config and the tokenizer (transformers builds it, chat
       template included, from the GGUF metadata) to a temporary sibling of OUT and rename it into place: nothing at OUT on failure.
Layer-type patterns (sliding / full attention) come from the family's config class, exactly as for a
Hugging Face directory of that family.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rrt_ray.convert.output import DTYPES, check_out, write_atomically

GGUF_SUFFIX = ".gguf"
CACHE_ENV = "RRT_CACHE_DIR"  # where GGUF sources are imported once, keyed by their content
_HASH_CHUNK = 1 << 22


@dataclass
class ImportReport:
    out: str
    model_type: str
    architecture: str  # the GGUF `general.architecture`
    params: int
    tensor_types: dict[str, int]  # GGUF storage type -> tensor count (e.g. {"Q4_1": 210, "F32": 61})


def is_gguf(src: str) -> bool:
    return str(src).lower().endswith(GGUF_SUFFIX)


def _read_header(path: Path) -> tuple[str, dict[str, int]]:
    """(general.architecture, tensor type counts); a ValueError naming the file when it is not readable GGUF."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = field.contents()
    except KeyError:
        raise ValueError(f"SRC {str(path)!r} is a GGUF file without general.architecture metadata") from None
    except Exception as err:  # numpy reshape/dtype errors on a truncated file, bad magic, bad version
        raise ValueError(f"SRC {str(path)!r} is not a readable GGUF file (truncated or corrupt: {err})") from None
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return str(arch), types


def gguf_config(src: str | Path):
    """The Hugging Face config of a GGUF file, without its quantization config; ValueError if unsupported."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from rrt_ray.models.arch import check_supported

    path = Path(src).expanduser()
    arch, _ = _read_header(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {str(src)!r}: transformers reads "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))} ({err})"
        ) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        check_supported(config)
    except ValueError as err:
        raise ValueError(f"GGUF {str(src)!r} (architecture {arch!r}): {err}") from None
    return config


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or load reports: a failed import must print exactly one line. (The GGUF
    dequantization bar is a bare tqdm on stderr, which transformers' switches do not reach.)"""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_plain_model(path: Path, config) -> torch.nn.Module:
    """The GGUF weights, dequantized to fp32, in a plain (serializable) model built from `config`."""
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        loaded, info = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, output_loading_info=True
        )
    missing = [k for k in info["missing_keys"] if k not in set(loaded.all_tied_weights_keys)]
    if missing:
        raise ValueError(f"GGUF {str(path)!r} does not set {len(missing)} parameter(s) of {config.model_type}, e.g. {missing[:3]}")
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    return plain.eval()


def import_gguf(src: str, out: str, *, dtype: str = "float32", overwrite: bool = False) -> ImportReport:
    """Write the GGUF model at SRC as a plain Hugging Face directory at OUT (safetensors in `dtype`)."""
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    path = Path(src).expanduser()
    if not path.is_file():
        raise ValueError(f"SRC {src!r} is not a file (expected a .gguf file)")
    out_path = check_out(out, overwrite)
    arch, types = _read_header(path)
    config = gguf_config(path)
    model = _load_plain_model(path, config)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # chat template included

    def write(tmp: Path) -> None:
        model.to(DTYPES[dtype]).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_atomically(out_path, write)
    return ImportReport(str(out_path), config.model_type, arch, model.num_parameters(), types)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rrt-ray").expanduser() / "gguf"


def resolve_model_path(src: str, *, log=None) -> str:
    """SRC unchanged, unless it is a local .gguf file: then the Hugging Face directory it imports to.

    The import is cached under $RRT_CACHE_DIR/gguf (default ~/.cache/rrt-ray/gguf) by the file's sha256,
    so a second call with the same file (under any name) costs one hash of the file.
    """
    if not is_gguf(src):
        return src
    path = Path(src).expanduser()
    if not path.is_file():
        raise ValueError(f"GGUF source {src!r} does not exist")
    out = cache_root() / f"{path.stem}-{file_digest(path)[:16]}"
    if (out / "config.json").is_file():
        return str(out)
    if log is not None:
        log(f"importing {src} -> {out}")
    try:
        import_gguf(str(path), str(out), overwrite=True)
    except OSError:
        if not (out / "config.json").is_file():  # not a concurrent import of the same file finishing first
            raise
    return str(out)


def add_import_command(sub) -> None:
    """`rrt import SRC OUT [--dtype]`: registered by rrt_ray/cli.py."""
    p = sub.add_parser(
        "import",
        help="import a GGUF file into a plain Hugging Face model directory",
        description="Import SRC (a .gguf file, any quantization transformers reads) into a Hugging Face directory at OUT.",
    )
    p.add_argument("src", metavar="SRC", help="a .gguf file")
    p.add_argument("out", metavar="OUT", help="output directory (written atomically)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="storage dtype of the safetensors (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=_run_import)


def _run_import(args) -> None:
    report = import_gguf(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    types = ", ".join(f"{n} {t}" for t, n in sorted(report.tensor_types.items()))
    print(f"{report.architecture} -> {report.model_type}: {report.params:,} parameters (GGUF tensors: {types})")
    print(f"wrote {report.out}")
