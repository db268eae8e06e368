"""The `rrt` console script: one subcommand per pipeline stage.

    rrt convert SRC OUT --loops B [--sharing MODE] [--init STRATEGY] [--lora-rank R|full|0] [--lora-init INIT]
    rrt import SRC.gguf OUT [--dtype float32|bfloat16]     (rrt_ray/convert/gguf_import.py)
    rrt fetch smollm2-135m [--root out/models]            (rrt_ray/convert/fetch.py)
    rrt eval MODEL [--docs N]                             (rrt_ray/lm_eval_task.py)

The choices of --sharing, --init and --lora-init are the registries SHARING_MODES, INIT_STRATEGIES and
LORA_INITS (`rrt convert --help` lists them): a registered entry is a choice here without editing this file.

Errors a user can cause print one line naming the bad value and what is allowed, and exit with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from rrt_ray.convert.calibrate import CALIBRATION_INPUTS, CalibrationSpec
from rrt_ray.convert.convert import DTYPES, ConvertSpec
from rrt_ray.convert.init_strategies import INIT_STRATEGIES
from rrt_ray.convert.lora_init import LORA_INITS
from rrt_ray.models.layer_map import SHARING_MODES
from rrt_ray.storage import StorageError


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face decoder into a (relaxed) recursive model",
        description="Convert SRC (a Hugging Face model directory or hub id) into a recursive model at OUT.",
    )
    p.add_argument("src", metavar="SRC", help="Hugging Face model directory, hub id, or s3:// URI")
    p.add_argument("out", metavar="OUT", help="output directory or s3:// URI (written atomically)")
    p.add_argument("--loops", type=int, required=True, help="B: how many times the shared block runs (divides the layer count)")
    default = {f.name: f.default for f in dataclasses.fields(ConvertSpec)}  # the spec's defaults, written once
    sharing_help = "; ".join(SHARING_MODES.get(name).help or name for name in SHARING_MODES)
    p.add_argument("--sharing", choices=SHARING_MODES.names(), default=default["sharing"], help=f"{sharing_help} (default: %(default)s)")
    p.add_argument("--init", choices=INIT_STRATEGIES.names(), default=default["init"], help=f"shared-layer initialisation: {INIT_STRATEGIES.allowed()} (default: %(default)s)")
    p.add_argument("--lora-rank", default=str(default["lora_rank"]), help="per-depth LoRA rank: an integer (clipped to each projection's full rank), 0 for a plain recursive model, or 'full' (exact)")
    p.add_argument("--lora-init", choices=LORA_INITS.names(), default=default["lora_init"], help=f"LoRA initialisation: {LORA_INITS.allowed()} (svd: truncated SVD of the residual; default: %(default)s)")
    p.add_argument("--lora-targets", default=None, help="comma-separated projections (q,k,v,o,gate,up,down or module names); default: all")
    p.add_argument("--lora-scale", type=float, default=default["lora_scale"], help="h = W'x + scale * B A x (default: %(default)s)")
    p.add_argument("--share-non-lora", action="store_true", help="share norm weights and biases across depths (not exact)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=default["dtype"], help="storage dtype of the output (default: %(default)s)")
    p.add_argument("--calibrate", type=int, default=CalibrationSpec().sequences, metavar="N", help="activation-aware SVD and shared init from N training-split sequences (default %(default)s: plain SVD)")
    p.add_argument("--calibrate-inputs", choices=tuple(CALIBRATION_INPUTS), default=CalibrationSpec().inputs, help="with --calibrate: whose activations fit each position's LoRA: " + "; ".join(f"{k}: {v}" for k, v in CALIBRATION_INPUTS.items()) + " (default: %(default)s)")
    p.add_argument("--reconstruct", action="store_true", help="with --calibrate: layer-wise reconstruction of each position's LoRA and norms (in execution order on the recursive model's own hidden states, unless --calibrate-inputs original)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from rrt_ray.convert import convert_checkpoint

    report = convert_checkpoint(
        args.src,
        args.out,
        loops=args.loops,
        sharing=args.sharing,
        init=args.init,
        lora_rank=args.lora_rank,
        lora_init=args.lora_init,
        lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets else None,
        lora_scale=args.lora_scale,
        share_non_lora=args.share_non_lora,
        dtype=args.dtype,
        calibration={"sequences": args.calibrate, "inputs": args.calibrate_inputs, "reconstruct": args.reconstruct},
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(report.table())
    if not report.lora_ranks:
        print("LoRA ranks: none (plain recursive)")
    print(f"wrote {report.out} in {report.seconds:.1f}s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rrt", description="Relaxed Recursive Transformers on Ray")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    from rrt_ray.convert.fetch import add_fetch_command
    from rrt_ray.convert.gguf_import import add_import_command
    from rrt_ray.lm_eval_task import add_eval_command

    add_import_command(sub)
    add_fetch_command(sub)
    add_eval_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, StorageError) as err:
        print(f"rrt {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
