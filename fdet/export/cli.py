"""``fdet export onnx`` and ``fdet export program``: a trained run (or checkpoint) to a file
holding the network and its postprocessing. Thin: the work is in :mod:`fdet.export`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_export_parser"]


def _load(args: argparse.Namespace) -> tuple[Path, Any, Any, tuple[int, int]]:
    """The checkpoint, experiment and model of ``args.run``, and the input size to export."""
    from fdet.export.graph import check_exportable, default_image_size
    from fdet.train import load_run, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.run)
    exp, model = load_run(checkpoint, device=args.device, ema=not args.no_ema)
    check_exportable(model)  # before any tracing
    if args.image_size:
        size = (args.image_size[0], args.image_size[1])
    else:
        size = default_image_size(exp.val_transforms)
    return checkpoint, exp, model, size


def _describe(size: tuple[int, int], dynamic_batch: bool) -> str:
    batch = "any batch size" if dynamic_batch else "batch size 1"
    return f"images [{'B' if dynamic_batch else 1}, 3, {size[0]}, {size[1]}] ({batch})"


def _cmd_onnx(args: argparse.Namespace) -> int:
    from fdet import specs
    from fdet.eval.classes import run_class_names
    from fdet.export.onnx import export_onnx, onnx_metadata
    from fdet.train.checkpoint import checkpoint_entries

    checkpoint, exp, model, size = _load(args)
    print(
        f"fdet export onnx: {checkpoint} -> {args.out}, {_describe(size, args.dynamic_batch)}",
        file=sys.stderr,
    )
    names = run_class_names(exp, checkpoint_entries(checkpoint))
    metadata = onnx_metadata(
        model,
        size,
        class_names=None if names is None else list(names),
        extra={"fdet.checkpoint": str(checkpoint), "fdet.spec": specs.to_json(exp.model)},
    )
    path = export_onnx(
        model,
        args.out,
        image_size=size,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        metadata=metadata,
    )
    print(
        f"fdet export onnx: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr
    )
    return 0


def _cmd_program(args: argparse.Namespace) -> int:
    from fdet.export.program import export_program

    checkpoint, _, model, size = _load(args)
    print(
        f"fdet export program: {checkpoint} -> {args.out}, {_describe(size, args.dynamic_batch)}",
        file=sys.stderr,
    )
    path = export_program(model, args.out, image_size=size, dynamic_batch=args.dynamic_batch)
    print(
        f"fdet export program: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)",
        file=sys.stderr,
    )
    return 0


def add_export_parser(sub: Any) -> None:
    """Add ``export`` with its subcommands ``onnx`` and ``program`` to the ``fdet`` command's
    subparsers ``sub``."""
    from fdet.cli import _add_import, _int_at_least, _output_file
    from fdet.export._opset import MIN_OPSET

    p = sub.add_parser(
        "export",
        help="export a trained run with its postprocessing (ONNX, torch.export)",
        description="Export a trained run or checkpoint with its postprocessing "
        "(normalization, network, decoding, NMS) as one graph: float32 images [B, 3, H, W] "
        "with pixel values 0-255 in; boxes, scores, labels, valid out.",
    )
    export_sub = p.add_subparsers(dest="export_command", required=True)

    def common(q: argparse.ArgumentParser, example: str) -> None:
        q.add_argument(
            "run",
            metavar="RUN_OR_CHECKPOINT",
            help="a run folder (its newest checkpoint; EMA weights when the run has them, unless "
            "--no-ema) or a checkpoint file",
        )
        q.add_argument("--out", required=True, type=_output_file(example), help="the file to write")
        q.add_argument(
            "--image-size",
            nargs=2,
            type=_int_at_least(1),
            metavar=("H", "W"),
            help="the input's height and width (default: the run's validation max_size rounded "
            "up to its pad_divisor, square)",
        )
        q.add_argument(
            "--dynamic-batch",
            action="store_true",
            help="any batch size (default: a batch of 1)",
        )
        q.add_argument("--device", default="cpu", help="where to trace the model (default: cpu)")
        q.add_argument(
            "--no-ema",
            action="store_true",
            help="the run's trained weights, not its EMA weights (when it has them)",
        )
        _add_import(q)

    q = export_sub.add_parser("onnx", help="an ONNX file (onnxruntime, TensorRT, ...)")
    common(q, "model.onnx")
    q.add_argument(
        "--opset",
        type=_int_at_least(MIN_OPSET),
        default=None,
        help=f"the ONNX opset, at least {MIN_OPSET} (default: the exporter's)",
    )
    q.set_defaults(func=_cmd_onnx)

    q = export_sub.add_parser("program", help="a torch.export ExportedProgram (.pt2)")
    common(q, "model.pt2")
    q.set_defaults(func=_cmd_program)
