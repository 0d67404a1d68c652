"""The ``fdet`` command. Thin: every subcommand calls into the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _cmd_spec(args: argparse.Namespace) -> int:
    from fdet import build, specs

    spec = specs.load(args.file, name=args.name)
    if args.json:
        print(specs.to_json(spec))
    else:
        print(specs.format_tree(spec))
    if args.build:
        import torch

        from fdet.registry import RegistryError

        model_spec = spec.model if isinstance(spec, specs.Experiment) else spec
        try:
            with torch.device("meta"):
                module = build(model_spec)
        except RegistryError as e:  # a spec class of one's own without a builder
            raise specs.SpecError(f"cannot build it: {e}", source=str(args.file)) from e
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
        given = [
            name
            for name, value in (
                ("a spec file", args.spec),
                ("--set", args.set),
                ("--out", args.out),
                ("--name", args.name),
                ("--compile", args.compile),
                ("--overwrite", args.overwrite),
            )
            if value
        ]
        if given:
            args.parser.error(
                f"--resume continues a run in its folder with its saved spec; {given[0]} does "
                "not go with it"
            )
        from pathlib import Path

        out = args.resume
        if not Path(out).is_dir():
            raise FileNotFoundError(f"no run folder at {out} to resume")
        if not (Path(out) / "spec.json").is_file():
            raise FileNotFoundError(f"{out} holds no run to resume (no spec.json)")
        exp = specs.load(Path(out) / "spec.json", specs.Experiment)
    else:
        if not args.spec:
            args.parser.error("a spec file (or --resume RUN_DIR) is needed")
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
    from fdet.train.run_dir import check_run_dir

    check_run_dir(out, resume=bool(args.resume), overwrite=args.overwrite)  # before saying more
    print(f"fdet train: {args.resume or args.spec} -> {out}", file=sys.stderr)
    result = train(
        exp,
        out,
        device=args.device,
        progress=not args.no_progress,
        resume=bool(args.resume),
        overwrite=args.overwrite,
    )
    if result.interrupted:
        return 130
    print(f"fdet train: done; run folder {out}", file=sys.stderr)
    return 0


def _default_out(spec_path: str) -> str:
    from pathlib import Path

    return str(Path("runs") / Path(spec_path).stem)


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.data:
        if args.images or args.annotations:
            args.parser.error("give --data, or --images and --annotations, not both")
        args.images, args.annotations = args.data
    if bool(args.images) != bool(args.annotations):
        args.parser.error("--images and --annotations go together")

    import json
    from pathlib import Path

    from fdet import specs
    from fdet.data.loader import make_loader
    from fdet.eval.coco import format_table
    from fdet.eval.evaluate import evaluate_model_types
    from fdet.inference.tta import TTAModel
    from fdet.train import load_run
    from fdet.train.data import evaluation_set
    from fdet.train.run_dir import resolve_checkpoint

    tta = specs.load(args.tta, specs.TTA, name="TTA") if args.tta else None
    checkpoint = str(resolve_checkpoint(args.run))
    exp, model = load_run(checkpoint, device=args.device)
    if tta is not None:
        masks = " (masks are not merged: box AP only)" if _has_masks(exp.model) else ""
        print(f"fdet eval: test-time augmentation{masks}: {tta}", file=sys.stderr)
        model = TTAModel(model, tta, size_divisor=exp.val_transforms.pad_divisor)
    data = (args.images, args.annotations) if args.images else None
    evaluation = evaluation_set(exp, checkpoint, data)
    dataset, label_to_category_id = evaluation.dataset, evaluation.label_to_category_id
    source = str(dataset.annotation_file)
    if label_to_category_id is None:
        print(
            f"fdet eval: warning: the run's class names are unknown (its checkpoint does not "
            f"record them and its training data cannot be read), so its labels are taken to be "
            f"the categories of {source} in id order: {', '.join(dataset.category_names)}",
            file=sys.stderr,
        )
    print(f"fdet eval: evaluating {checkpoint} on {source}", file=sys.stderr)
    loader = make_loader(
        dataset,
        batch_size=args.batch_size or exp.batch_size,
        shuffle=False,
        seed=exp.seed,
        num_workers=exp.num_workers,
        pad_divisor=exp.val_transforms.pad_divisor,
        drop_last=False,
    )
    # boxes, and masks too where the model predicts them and the annotations have them
    by_type, results = evaluate_model_types(
        model,
        loader,
        dataset,
        max_images=args.max_images,
        backend=args.backend,
        device=args.device,
        label_to_category_id=label_to_category_id,
    )
    for iou_type, metrics in by_type.items():
        print(format_table(metrics, iou_type=iou_type if len(by_type) > 1 else None))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        metrics_json = {iou_type: m.to_dict() for iou_type, m in by_type.items()}
        out.write_text(json.dumps(metrics_json, indent=2) + "\n")
    if args.results:
        results_file = Path(args.results)
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results))
    return 0


def _has_masks(model_spec: object) -> bool:
    return getattr(model_spec, "mask_head", None) is not None


def _output_file(example: str) -> Callable[[str], str]:
    """An argparse type: a file path fdet can write (not a folder, under a writable folder)."""

    def check(value: str) -> str:
        import os
        from pathlib import Path

        path = Path(value)
        if path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{value} is a folder; give a file to write, e.g. {path / example}"
            )
        parent = path.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise argparse.ArgumentTypeError(f"cannot write {value}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write {value}: {parent} is not writable")
        return value

    return check


def _int_at_least(low: int, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (``what`` says why, when it is not obvious)."""

    def check(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{what}, got {number}")
        return number

    return check


def _cmd_data_shapes(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fdet.data.coco import DataError
    from fdet.data.shapes import find_set, generate, read_manifest

    out = Path(args.out)
    params = dict(train=args.train, val=args.val, size=args.size, seed=args.seed)
    counts = f"{args.train} train and {args.val} val images"
    if find_set(out, **params) is not None:
        print(f"fdet data shapes: {out} already holds this set ({counts}); nothing written")
        return 0
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        manifest = read_manifest(out)
        if manifest is None:
            held = "is not empty and holds no shapes set"
        else:
            keys = ("train", "val", "size", "seed", "min_object_size", "max_objects", "version")
            given = ", ".join(f"{k} {manifest.get(k)}" for k in keys if k in manifest)
            held = f"holds a shapes set with other parameters ({given})"
        raise DataError(f"{out}: {held}; choose another folder, or remove this one first")
    try:
        generate(out, **params)
    except OSError as e:
        raise DataError(f"{out}: cannot write the shapes set: {e.strerror or e}") from e
    print(f"fdet data shapes: wrote {counts} under {out}")
    return 0


def _fraction(value: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return number


def _cmd_data_split(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fdet.data.semi import split_coco

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        from fdet.data.coco import DataError

        raise DataError(f"{out}: is a file, not a folder")
    counts = split_coco(args.annotations, out, fraction=args.fraction, seed=args.seed)
    print(
        f"fdet data split: {counts.labeled_images} labeled images "
        f"({counts.labeled_annotations} annotations) in {out / 'labeled.json'}, "
        f"{counts.unlabeled_images} unlabeled images in {out / 'unlabeled.json'}"
    )
    return 0


def _cmd_data_browse(args: argparse.Namespace) -> int:
    from fdet.viz.browse import browse, open_source

    source = open_source(
        args.source,
        images=args.images,
        split=args.split,
        transforms=not args.no_transforms,
        seed=args.seed,
        overrides=args.set,
    )
    index = browse(
        source.dataset,
        args.out,
        count=args.count,
        seed=source.seed,
        class_names=source.class_names,
        title=source.title,
    )
    print(f"fdet data browse: wrote {index}")
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
        "--name", help="the constant to take from a .py file (default: EXPERIMENT, MODEL, TTA)"
    )
    p.add_argument("--json", action="store_true", help="print the spec as JSON")
    p.add_argument("--build", action="store_true", help="also build it and count parameters")
    _add_import(p)
    p.set_defaults(func=_cmd_spec)

    p = sub.add_parser("train", help="train an experiment spec")
    p.add_argument("spec", nargs="?", help="an experiment spec file (.py or .json)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run from its newest usable checkpoint (an unreadable one is passed "
        "over for the one before, with a warning)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override one spec field, e.g. --set optimizer.lr=0.02 (JSON values; repeatable)",
    )
    p.add_argument("--compile", action="store_true", help="also compile the network")
    p.add_argument("--dry-run", action="store_true", help="print the spec, model and data; stop")
    p.add_argument(
        "--out",
        help="the run folder (default: runs/<spec name>); one that holds a run is refused "
        "unless --overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run the folder holds first (its spec, logs, checkpoints, metrics)",
    )
    p.add_argument("--name", help="the constant to take from a .py file (default: EXPERIMENT)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")
    _add_import(p)
    p.set_defaults(func=_cmd_train, parser=p)

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
    p.add_argument(
        "--max-images", type=_int_at_least(1), default=None, help="evaluate the first N images"
    )
    p.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=None,
        help="images a batch (default: the experiment's batch_size)",
    )
    p.add_argument("--backend", choices=("faster", "pycocotools"), default="faster")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--tta",
        metavar="FILE",
        help="evaluate with test-time augmentation: a spec file defining TTA (specs/tta/)",
    )
    p.add_argument(
        "--out", type=_output_file("metrics.json"), help="write the metrics as JSON to this file"
    )
    p.add_argument(
        "--results",
        type=_output_file("results.json"),
        help="write the COCO-format detections as JSON to this file",
    )
    _add_import(p)
    p.set_defaults(func=_cmd_eval, parser=p)

    p = sub.add_parser("data", help="data set tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("shapes", help="write the synthetic shapes set (PNG + COCO JSON)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--train", type=_int_at_least(0), default=2000, help="training images")
    q.add_argument("--val", type=_int_at_least(0), default=200, help="validation images")
    q.add_argument(
        "--size",
        type=_int_at_least(16, " (twice the smallest object, 8 px)"),
        default=128,
        help="image side in pixels (at least 16)",
    )
    q.add_argument("--seed", type=_int_at_least(0), default=0)
    q.set_defaults(func=_cmd_data_shapes)
    q = data_sub.add_parser(
        "browse",
        help="a gallery of a data set's images with their annotations drawn after the "
        "training transforms (index.html and a PNG an image)",
    )
    q.add_argument(
        "source",
        metavar="DATA_SPEC_OR_ANNOTATIONS",
        help="an experiment spec file (.py or .json), or a COCO annotation file (with --images)",
    )
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--images", help="the image folder of a COCO annotation file")
    q.add_argument("--count", type=_int_at_least(1), default=16, help="images to show")
    q.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=None,
        help="the seed of the image order and augmentation (default: the experiment's, or 0)",
    )
    q.add_argument(
        "--split",
        choices=("train", "val"),
        default=None,
        help="a spec's training set with train_transforms (default) or validation set with "
        "val_transforms",
    )
    q.add_argument(
        "--no-transforms", action="store_true", help="the images as stored, not transformed"
    )
    q.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override one field of the experiment spec (as fdet train --set; repeatable)",
    )
    q.set_defaults(func=_cmd_data_browse)
    q = data_sub.add_parser(
        "split",
        help="split a COCO annotation file into labeled and unlabeled images, for "
        "semi-supervised training (labeled.json and unlabeled.json)",
    )
    q.add_argument("annotations", help="a COCO annotation file")
    q.add_argument(
        "--fraction",
        type=_fraction,
        required=True,
        help="the fraction of the images that keep their annotations (at least one image)",
    )
    q.add_argument("--seed", type=_int_at_least(0), default=0, help="the seed of the choice")
    q.add_argument("--out", required=True, help="output folder")
    q.set_defaults(func=_cmd_data_split)

    from fdet.inference.cli import add_infer_parser

    _add_import(add_infer_parser(sub))

    from fdet.export.cli import add_export_parser

    add_export_parser(sub)

    from fdet.analysis.cli import add_analyze_parser

    add_analyze_parser(sub)
    return parser


_DEBUG_HELP = "on an error, show the traceback too (also: FDET_DEBUG=1)"


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` before the command (``fdet --debug train …``) and after it, on every
    subcommand (``fdet train … --debug``)."""
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    pending = [parser]
    while pending:
        for action in pending.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    # SUPPRESS: a subcommand without the flag keeps the value given before it
                    sub.add_argument(
                        "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
                    )
                    pending.append(sub)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fdet`` command. A user error (a bad spec, data, checkpoint, device or path, a run
    that cannot go on) is one line, ``fdet COMMAND: error: …``, and exit status 2; an
    interrupt exits with 130. ``--debug`` (or ``FDET_DEBUG=1``) shows the traceback too."""
    import os
    import traceback

    parser = make_parser()
    _add_debug(parser)
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("FDET_DEBUG", "") not in ("", "0")
    from fdet.data.coco import DataError
    from fdet.specs import SpecError
    from fdet.train.checkpoint import CheckpointError
    from fdet.train.engine import TrainingError

    try:
        _import_plugins(getattr(args, "imports", []))
        return int(args.func(args))
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"fdet {args.command}: interrupted", file=sys.stderr)
        return 130
    # OSError: missing files, unwritable folders; ValueError: bad input (DataError,
    # SpecError and CheckpointError are ValueErrors too, named for the reader)
    except (SpecError, DataError, CheckpointError, TrainingError, ValueError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"fdet {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
