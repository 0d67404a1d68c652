"""``fdet analyze``: an HTML report of a trained run (:func:`fdet.analysis.report.write_report`)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_analyze_parser", "cmd_analyze"]


def _float_in_unit(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {number}")
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def cmd_analyze(args: argparse.Namespace) -> int:
    from fdet.analysis.report import write_report

    index = write_report(
        args.runs,
        args.out,
        data=tuple(args.data) if args.data else None,
        max_images=args.max_images,
        device=args.device,
        score_threshold=args.score_threshold,
        iou_threshold=args.iou_threshold,
    )
    print(f"fdet analyze: wrote {index}", file=sys.stderr)
    return 0


def add_analyze_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``analyze`` command to the ``fdet`` subcommands; returns its parser."""
    p = sub.add_parser(
        "analyze",
        help="an HTML report of a trained run: metrics, curves, errors, images, data, model",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folders or checkpoint files: the first is analyzed, the training curves of "
        "all are overlaid",
    )
    p.add_argument("--out", required=True, help="output folder (gets index.html)")
    p.add_argument(
        "--data",
        nargs=2,
        metavar=("IMAGES_DIR", "ANNOTATIONS"),
        help="analyze on another COCO-format data set (default: the run's validation set)",
    )
    p.add_argument("--max-images", type=_positive_int, default=None, help="use the first N images")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument(
        "--score-threshold",
        type=_float_in_unit,
        default=0.3,
        help="detections kept for the confusion matrix and the image galleries (default 0.3)",
    )
    p.add_argument(
        "--iou-threshold",
        type=_float_in_unit,
        default=0.5,
        help="IoU that makes a match for the confusion matrix and galleries (default 0.5)",
    )
    p.set_defaults(func=cmd_analyze)
    return p
