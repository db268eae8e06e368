"""Convert a Hugging Face decoder checkpoint into a (Relaxed) Recursive Transformer directory.

Conversion is data: the recursive model is built on the meta device to list its parameters, and each
one is computed from the source tensors it stands for:
    shared linear  W'_k           = mean of the source layers chosen by the init strategy
    LoRA at (k, b) (A, B)         = truncated SVD of W_{tied[k][b]} - W'_k   (or zero init)
    per-depth norm / bias [b]     = the tied original layer's own tensor
    embeddings, final norm, head  = copied
It streams one shared layer at a time into its own safetensors shard, so converting a 1B model holds
the embeddings plus one layer group in memory, not three copies of the model. Everything is written to
a temporary sibling of OUT and renamed into place at the end: a failed conversion leaves nothing at OUT.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from rrt_ray import storage
from rrt_ray.convert.init_strategies import INIT_STRATEGIES, init_source_layers
from rrt_ray.convert.calibrate import CalibrationSpec, LayerStats, activation_weighted_mean, calibrate_dir, calibration_stats
from rrt_ray.convert.gguf_import import resolve_model_path
from rrt_ray.convert.lora_init import LORA_INITS, LoRAInitInput
from rrt_ray.convert.output import DTYPES, check_out, write_atomically
from rrt_ray.convert.source import SourceCheckpoint, checkpoint_renames, resolve_source
from rrt_ray.models.arch import ARCHITECTURES, arch_spec, check_supported, layers_path, resolve_projections
from rrt_ray.models.config import RecursiveConfig
from rrt_ray.models.layer_map import SHARING_MODES, check_loops, tied_layers
from rrt_ray.models.lora import RelaxedLoRALinear
from rrt_ray.models.per_depth import PerDepth
from rrt_ray.models.recursive import RecursiveForCausalLM

# Files copied verbatim from SRC so that the output is a complete Hugging Face directory.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass
class ConvertSpec:
    """What `rrt convert` is asked to do: built (and validated) once, before any weight is read, then passed on.

    A new conversion option is a field here with a default and a check in __post_init__; it reaches the
    saved config's provenance through `to_dict` without further edits.
    """

    loops: int
    sharing: str = "cycle"
    init: str = "average"
    lora_rank: int | str = 0  # int >= 0, or "full" (exact: reproduces the original model)
    lora_init: str = "svd"
    lora_targets: tuple[str, ...] | None = None  # None: every linear projection of the layer
    lora_scale: float = 1.0
    share_non_lora: bool = False
    dtype: str = "float32"
    calibration: CalibrationSpec | dict | None = None  # --calibrate N [--reconstruct]; None: the paper's plain SVD

    def __post_init__(self) -> None:
        if not isinstance(self.calibration, CalibrationSpec):
            self.calibration = CalibrationSpec(**(self.calibration or {}))
        if isinstance(self.lora_rank, str) and self.lora_rank != "full":
            try:
                self.lora_rank = int(self.lora_rank)
            except ValueError:
                raise ValueError(f"--lora-rank must be an integer >= 0 or 'full', got {self.lora_rank!r}") from None
        if isinstance(self.lora_rank, int) and self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be an integer >= 0 or 'full', got {self.lora_rank}")
        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)
        SHARING_MODES.check(self.sharing)
        INIT_STRATEGIES.check(self.init)
        LORA_INITS.check(self.lora_init)
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.loops < 1:
            raise ValueError(f"--loops must be >= 1, got {self.loops}")

    def to_dict(self) -> dict:
        options = dataclasses.asdict(self)
        options["lora_targets"] = None if self.lora_targets is None else list(self.lora_targets)
        return options

    def recursive_config(self, text: PreTrainedConfig, ranks: dict[str, int]) -> RecursiveConfig:
        """The RecursiveConfig this spec makes of the original config `text` with resolved LoRA ranks."""
        return RecursiveConfig(
            text_config=text.to_dict(),
            num_loops=self.loops,
            sharing=self.sharing,
            lora_rank=ranks,
            lora_scale=self.lora_scale,
            share_non_lora=self.share_non_lora,
            init_strategy=self.init,
            lora_init=self.lora_init,
        )


@dataclass
class ConvertReport:
    out: str
    params: dict[str, int]
    original_params: int
    seconds: float
    lora_ranks: dict[str, int] = field(default_factory=dict)

    def table(self) -> str:
        rows = [(role, n) for role, n in self.params.items() if role != "total"]
        rows += [("total", self.params["total"]), ("original", self.original_params)]
        lines = [f"{'parameters':<12}{'count':>15}{'of original':>13}"]
        for role, n in rows:
            lines.append(f"{role:<12}{n:>15,}{n / self.original_params:>12.1%}")
        if self.lora_ranks:  # per projection: clipped ones (narrower k/v under GQA) show their own rank
            lines.append("LoRA rank   " + ", ".join(f"{leaf}={r}" for leaf, r in self.lora_ranks.items()))
        return "\n".join(lines)




def _projection_shapes(original: torch.nn.Module, model_type: str) -> dict[str, tuple[int, int]]:
    """Module name -> (d_out, d_in) of every linear projection in the original model's first decoder layer."""
    spec = arch_spec(model_type)
    layers = original.get_submodule(spec.layers) if _has_submodule(original, spec.layers) else None
    if not isinstance(layers, torch.nn.ModuleList) or not layers:
        raise ValueError(
            f"unsupported architecture {model_type!r}: no decoder layer list at {spec.layers!r} "
            f"(tested: {ARCHITECTURES.allowed()})"
        )
    return {
        name.rpartition(".")[2]: (module.out_features, module.in_features)
        for name, module in layers[0].named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def _has_submodule(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _resolve_ranks(shapes: dict[str, tuple[int, int]], spec: ConvertSpec, model_type: str) -> dict[str, int]:
    """Rank per projection module name, validated against every matrix it applies to."""
    targets = sorted(shapes) if spec.lora_targets is None else resolve_projections(spec.lora_targets, set(shapes), model_type)
    if spec.lora_rank == 0:
        return {}
    full = {leaf: min(shapes[leaf]) for leaf in targets}  # a module's full rank: min(d_out, d_in)
    if spec.lora_rank == "full":
        return full
    if spec.lora_rank > max(full.values()):
        allowed = ", ".join(f"{leaf} {shapes[leaf][0]}x{shapes[leaf][1]}: {r}" for leaf, r in full.items())
        raise ValueError(
            f"--lora-rank {spec.lora_rank} is larger than the full rank of every targeted projection ({allowed}); "
            f"use at most {max(full.values())} or 'full'"
        )
    # Narrower matrices (k/v under GQA/MQA) are clipped to their full rank, where they are exact.
    return {leaf: min(spec.lora_rank, r) for leaf, r in full.items()}


@dataclass
class ConversionPlan:
    """What converting a given model with a given spec produces, known before any weight is read."""

    skeleton: RecursiveForCausalLM  # on the meta device
    original: torch.nn.Module  # the source architecture, on the meta device
    lora_ranks: dict[str, int]  # projection name -> rank (empty at rank 0)

    @property
    def params(self) -> dict[str, int]:
        return self.skeleton.parameter_counts()

    @property
    def original_params(self) -> int:
        return self.original.num_parameters()


def plan_conversion(text: PreTrainedConfig, spec: ConvertSpec) -> ConversionPlan:
    """Check spec against the source's config (architecture, loops, ranks) and build both meta models.

    Raises ValueError naming the bad value and what is allowed; reads no weights, so a sweep can check
    every point of its search space in milliseconds.
    """
    check_supported(text)
    check_loops(text.num_hidden_layers, spec.loops, spec.sharing)
    with torch.device("meta"):
        original = AutoModelForCausalLM.from_config(text)
    ranks = _resolve_ranks(_projection_shapes(original, text.model_type), spec, text.model_type)
    with torch.device("meta"):
        skeleton = RecursiveForCausalLM(spec.recursive_config(text, ranks))
    return ConversionPlan(skeleton, original, ranks)


class _LayerGroupConverter:
    """Computes the tensors of one shared layer from the source layers tied to it."""

    def __init__(self, source: SourceCheckpoint, config: RecursiveConfig, spec: ConvertSpec, stats: LayerStats | None = None) -> None:
        text = config.text_config
        self.source, self.spec, self.stats = source, spec, stats
        self.prefix = layers_path(text.model_type)
        self.tied = tied_layers(text.num_hidden_layers, config.num_loops, config.sharing)
        self.init_from = init_source_layers(spec.init, text.num_hidden_layers, config.num_loops, config.sharing)
        self.scale = config.lora_scale

    def _mean(self, layers: list[int], rel: str) -> torch.Tensor:
        # Out of place: a source may hand out the same tensor again (a memory-mapped .bin), so never write to it.
        total = self.source.get(f"{self.prefix}.{layers[0]}.{rel}")
        for layer in layers[1:]:
            total = total + self.source.get(f"{self.prefix}.{layer}.{rel}")
        return total / len(layers)

    def _stack(self, k: int, rel: str) -> torch.Tensor:  # (B, *shape), one slice per depth
        return torch.stack([self.source.get(f"{self.prefix}.{layer}.{rel}") for layer in self.tied[k]])

    def _shared_weight(self, k: int, rel: str) -> torch.Tensor:  # W'_k: (d_out, d_in)
        if self.stats is None or not self.spec.calibration.weighted_shared:
            return self._mean(self.init_from[k], f"{rel}.weight")
        layers = self.init_from[k]
        weights = [self.source.get(f"{self.prefix}.{layer}.{rel}.weight") for layer in layers]
        return activation_weighted_mean(weights, [self.stats.moment(layer, rel) for layer in layers], self.spec.calibration.damping)

    def linear(self, k: int, rel: str, module: RelaxedLoRALinear) -> dict[str, torch.Tensor]:
        shared = self._shared_weight(k, rel)
        tensors = {"weight": shared}
        if module.bias is not None:
            shared_bias = module.bias.dim() == 1
            tensors["bias"] = self._mean(self.init_from[k], f"{rel}.bias") if shared_bias else self._stack(k, f"{rel}.bias")
        if module.rank > 0:
            init = LORA_INITS.get(self.spec.lora_init)
            lora_a, lora_b = [], []
            for depth, layer in enumerate(self.tied[k]):
                original = functools.partial(self.source.get, f"{self.prefix}.{layer}.{rel}.weight")
                moment = None if self.stats is None else self.stats.moment(layer, rel)
                a, b = init(LoRAInitInput(original, shared, module.rank, self.scale, seed=k * 1000 + depth,
                                          moment=moment, damping=self.spec.calibration.damping))
                lora_a.append(a)
                lora_b.append(b)
            tensors["lora_a"] = torch.stack(lora_a)  # (B, r, d_in)
            tensors["lora_b"] = torch.stack(lora_b)  # (B, d_out, r)
        return tensors

    def per_depth(self, k: int, rel: str, module: PerDepth) -> dict[str, torch.Tensor]:
        return {name: self._stack(k, f"{rel}.{name}") for name in module.param_names}

    def shared_small(self, k: int, rel: str, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self._mean(self.init_from[k], f"{rel}.{name}") for name in names}


def _layer_tensors(layer: torch.nn.Module, k: int, group: _LayerGroupConverter) -> dict[str, torch.Tensor]:
    """All tensors of shared layer k, named relative to the layer."""
    out: dict[str, torch.Tensor] = {}
    for rel, module in layer.named_modules():
        if isinstance(module, RelaxedLoRALinear):
            tensors = group.linear(k, rel, module)
        elif isinstance(module, PerDepth):
            tensors = group.per_depth(k, rel, module)
        else:  # with share_non_lora, norms stay plain modules holding one shared copy
            names = [name for name, _ in module.named_parameters(recurse=False)]
            tensors = group.shared_small(k, rel, names) if names else {}
        out.update({f"{rel}.{name}": t for name, t in tensors.items()})
    return out


def convert_checkpoint(
    src: str,
    out: str,
    spec: ConvertSpec | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> ConvertReport:
    """Convert SRC (a Hugging Face directory, hub id or s3:// URI) into a recursive model at OUT.

    Pass a ConvertSpec, or its fields as keyword arguments (loops=2, lora_rank="full", ...).
    An s3:// SRC is downloaded (checksums verified) to a temporary directory first; an s3:// OUT is
    converted locally and then uploaded, its checksum manifest written last.
    """
    if spec is None:
        spec = ConvertSpec(**options)
    elif options:
        raise TypeError(f"pass either a ConvertSpec or its fields, not both (got {sorted(options)})")
    started = time.perf_counter()
    if storage.is_remote(src) or storage.is_remote(out):
        report = _convert_remote(src, out, spec, overwrite, progress)
    else:
        report = _convert_local(src, out, spec, overwrite, progress)
    report.seconds = time.perf_counter() - started
    return report


def _convert_remote(src: str, out: str, spec: ConvertSpec, overwrite: bool, progress: bool) -> ConvertReport:
    for uri in (src, out):
        if storage.is_remote(uri):
            storage.check_s3_access(uri)
    if storage.is_remote(out) and storage.exists(storage.join(out, "config.json")) and not overwrite:
        raise ValueError(f"OUT {out!r} already holds a model; pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix="rrt-convert-") as scratch:
        local_src = src
        if storage.is_remote(src):
            local_src = str(Path(scratch) / "src")
            storage.download_dir(src, local_src)
        local_out = str(Path(scratch) / "out") if storage.is_remote(out) else out
        report = _convert_local(local_src, local_out, spec, overwrite, progress, source_name=src)
        if storage.is_remote(out):
            storage.upload_dir(local_out, out)
            report.out = out
    return report


def _convert_local(
    src: str, out: str, spec: ConvertSpec, overwrite: bool, progress: bool, source_name: str | None = None
) -> ConvertReport:
    out_path = check_out(out, overwrite)
    src_path = resolve_source(resolve_model_path(src))  # a .gguf SRC is imported once, cached by content
    plan = plan_conversion(AutoConfig.from_pretrained(src_path), spec)
    skeleton, original, ranks = plan.skeleton, plan.original, plan.lora_ranks
    source = SourceCheckpoint(src_path, checkpoint_renames(original))
    config = skeleton.config
    config.dtype = spec.dtype
    config.provenance = provenance(source_name or src, src_path, spec)
    stats = calibration_stats(src_path, spec.calibration) if spec.calibration.enabled else None

    def write(tmp: Path) -> None:
        _write_weights(skeleton, source, spec, tmp, progress, stats)
        config.save_pretrained(tmp)
        for name in COPIED_FILES:
            if (src_path / name).is_file():
                shutil.copy2(src_path / name, tmp / name)
        if spec.calibration.reconstruct or spec.calibration.sequential:
            calibrate_dir(tmp, src_path, stats, spec.calibration, DTYPES[spec.dtype])

    write_atomically(out_path, write)
    return ConvertReport(str(out_path), skeleton.parameter_counts(), original.num_parameters(), 0.0, ranks)


def provenance(source: str, src_path: Path, spec: ConvertSpec) -> dict:
    """What a converted model was made from: source, sha256 of its config and weight files, options, version."""
    from rrt_ray import __version__
    from rrt_ray.storage.manifest import sha256_file

    files = sorted(
        p for p in src_path.iterdir()
        if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    )  # fmt: skip
    return {
        "source": source,
        "source_sha256": {p.name: sha256_file(p) for p in files},
        "conversion": spec.to_dict(),
        "rrt_ray_version": __version__,
    }


def _write_weights(
    skeleton: RecursiveForCausalLM, source: SourceCheckpoint, spec: ConvertSpec, tmp: Path, progress: bool, stats: LayerStats | None = None
) -> None:
    dtype = DTYPES[spec.dtype]
    shared = skeleton.unrolled_layers.shared
    layers_prefix = "backbone." + layers_path(skeleton.config.text_config.model_type)
    tied_targets = set(skeleton.all_tied_weights_keys)
    group = _LayerGroupConverter(source, skeleton.config, spec, stats)
    num_shards = len(shared) + 1
    weight_map: dict[str, str] = {}
    total_size = 0

    def write(shard: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total_size
        file = f"model-{shard:05d}-of-{num_shards:05d}.safetensors"
        tensors = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total_size += t.numel() * t.element_size()

    # Shard 1: everything outside the shared layers (embeddings, final norm, untied head).
    outside = {}
    for name, _ in skeleton.named_parameters():
        if name.startswith(layers_prefix + ".") or name in tied_targets:
            continue
        source_name = name.removeprefix("backbone.")
        if source_name not in source:
            raise ValueError(f"source checkpoint has no tensor {source_name!r}; is it a {skeleton.config.text_config.model_type} model?")
        outside[name] = source.get(source_name)
    write(1, outside)
    del outside

    bar = tqdm(range(len(shared)), desc="converting shared layers", unit="layer", disable=not progress, file=sys.stderr)
    for k in bar:
        tensors = _layer_tensors(shared[k], k, group)
        write(k + 2, {f"{layers_prefix}.shared.{k}.{rel}": t for rel, t in tensors.items()})
    expected = {n for n, _ in skeleton.named_parameters()} - tied_targets
    missing = expected - set(weight_map)
    if missing:
        raise RuntimeError(f"conversion left parameters unset: {sorted(missing)[:5]}")
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
