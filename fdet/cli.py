"""The ``fdet`` command. Thin: every subcommand calls into the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_spec(args: argparse.Namespace) -> int:
    from fdet import build, specs

    spec = specs.load(args.file, name=args.name)
    if args.json:
        print(specs.to_json(spec))
    else:
        print(specs.format_tree(spec))
    if args.build:
        import torch

        model_spec = spec.model if isinstance(spec, specs.Experiment) else spec
        with torch.device("meta"):
            module = build(model_spec)
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        print(
            f"built {type(module).__name__}: {total:,} parameters, {trainable:,} trainable",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import attrs

    from fdet import specs
    from fdet.train import train
    from fdet.train.engine import dry_run

    if args.resume:
        if args.spec or args.set:
            raise SystemExit(
                "fdet train: error: --resume continues a run with its saved spec; "
                "give no spec file and no --set"
            )
        exp = specs.load(f"{args.resume}/spec.json", specs.Experiment)
        out = args.resume
    else:
        if not args.spec:
            raise SystemExit("fdet train: error: a spec file (or --resume RUN_DIR) is needed")
        exp = specs.load(args.spec, specs.Experiment, name=args.name)
        if args.set:
            from fdet.specs import apply_overrides

            exp = apply_overrides(exp, args.set)
        if args.compile:
            exp = attrs.evolve(exp, compile="model")
        out = args.out or _default_out(args.spec)
    if args.dry_run:
        dry_run(exp, sys.stdout)
        return 0
    print(f"fdet train: {args.resume or args.spec} -> {out}", file=sys.stderr)
    result = train(
        exp, out, device=args.device, progress=not args.no_progress, resume=bool(args.resume)
    )
    if result.interrupted:
        return 130
    print(f"fdet train: done; run folder {out}", file=sys.stderr)
    return 0


def _default_out(spec_path: str) -> str:
    from pathlib import Path

    return str(Path("runs") / Path(spec_path).stem)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fdet.data.coco import CocoDataset
    from fdet.data.loader import make_loader
    from fdet.data.transforms import build_transform
    from fdet.eval.coco import format_table
    from fdet.eval.evaluate import evaluate_model
    from fdet.train import load_run
    from fdet.train.engine import check_classes, make_datasets

    exp, model = load_run(args.run, device=args.device)
    if args.data:
        args.images, args.annotations = args.data
    if args.images or args.annotations:
        if not (args.images and args.annotations):
            raise SystemExit("fdet eval: error: --images and --annotations go together")
        dataset = CocoDataset(
            args.images,
            args.annotations,
            transform=build_transform(exp.val_transforms, train=False),
        )
        check_classes(exp.model, dataset, str(args.annotations))
    else:
        dataset = make_datasets(exp, with_train=False).val
    loader = make_loader(
        dataset,
        batch_size=args.batch_size or exp.batch_size,
        shuffle=False,
        seed=exp.seed,
        num_workers=exp.num_workers,
        pad_divisor=exp.val_transforms.pad_divisor,
        drop_last=False,
    )
    metrics, results = evaluate_model(
        model, loader, dataset, max_images=args.max_images, backend=args.backend, device=args.device
    )
    print(format_table(metrics))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"bbox": metrics.to_dict()}, indent=2) + "\n")
    if args.results:
        Path(args.results).write_text(json.dumps(results))
    return 0


def _cmd_data_shapes(args: argparse.Namespace) -> int:
    from fdet.data.shapes import generate

    paths = generate(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed)
    print(f"fdet data shapes: wrote {args.train} train and {args.val} val images under {args.out}")
    del paths
    return 0


def _import_plugins(items: Sequence[str]) -> None:
    """Import each ``--import`` item: a module name (looked up from the current folder too) or
    a ``.py`` file, so that the spec classes and builders it registers are known."""
    import importlib
    import os

    from fdet.specs import load_module

    if items and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for item in items:
        try:
            if item.endswith(".py"):
                load_module(item)
            else:
                importlib.import_module(item)
        except (ImportError, FileNotFoundError) as e:
            raise SystemExit(f"fdet: error: --import {item}: {e}") from None


def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module or .py file first: one that defines and registers spec classes "
        "of your own (repeatable)",
    )


def make_parser() -> argparse.ArgumentParser:
    from fdet import __version__

    parser = argparse.ArgumentParser(prog="fdet", description="Functional object detection.")
    parser.add_argument("--version", action="version", version=f"fdet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("spec", help="load, validate and print a spec file (.py or .json)")
    p.add_argument("file", help="a spec file")
    p.add_argument(
        "--name", help="the constant to take from a .py file (default: EXPERIMENT, MODEL)"
    )
    p.add_argument("--json", action="store_true", help="print the spec as JSON")
    p.add_argument("--build", action="store_true", help="also build it and count parameters")
    _add_import(p)
    p.set_defaults(func=_cmd_spec)

    p = sub.add_parser("train", help="train an experiment spec")
    p.add_argument("spec", nargs="?", help="an experiment spec file (.py or .json)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override one spec field, e.g. --set optimizer.lr=0.02 (JSON values; repeatable)",
    )
    p.add_argument("--compile", action="store_true", help="also compile the network")
    p.add_argument("--dry-run", action="store_true", help="print the spec, model and data; stop")
    p.add_argument("--out", help="the run folder (default: runs/<spec name>)")
    p.add_argument("--name", help="the constant to take from a .py file (default: EXPERIMENT)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")
    _add_import(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="COCO evaluation of a trained run or checkpoint")
    p.add_argument(
        "run", help="a run folder (uses its newest checkpoints/iter_N.pt) or a checkpoint file"
    )
    p.add_argument(
        "--data",
        nargs=2,
        metavar=("IMAGES_DIR", "ANNOTATIONS"),
        help="evaluate on another COCO-format data set (image folder and annotation file)",
    )
    p.add_argument("--images", help="image folder of another COCO-format data set")
    p.add_argument("--annotations", help="its annotation file")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--backend", choices=("faster", "pycocotools"), default="faster")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--results", help="write the COCO-format detections as JSON here")
    _add_import(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("data", help="data set tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("shapes", help="write the synthetic shapes set (PNG + COCO JSON)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--train", type=int, default=2000, help="training images")
    q.add_argument("--val", type=int, default=200, help="validation images")
    q.add_argument("--size", type=int, default=128, help="image side in pixels")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_data_shapes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    from fdet.data.coco import DataError
    from fdet.specs import SpecError
    from fdet.train.engine import TrainingError

    _import_plugins(getattr(args, "imports", []))
    try:
        return int(args.func(args))
    except (SpecError, DataError, TrainingError, FileNotFoundError) as e:
        print(f"fdet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
