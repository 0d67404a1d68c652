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

        with torch.device("meta"):
            module = build(spec)
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        print(
            f"built {type(module).__name__}: {total:,} parameters, {trainable:,} trainable",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0


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
    p.set_defaults(func=_cmd_spec)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    from fdet.specs import SpecError

    try:
        return int(args.func(args))
    except (SpecError, FileNotFoundError) as e:
        print(f"fdet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
