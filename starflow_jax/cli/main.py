"""The ``starflow-jax`` command line."""
from __future__ import annotations

import argparse
import sys

from starflow_jax.cli import bench, convert, info, nll, parity, sample, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starflow-jax", description="STARFlow / STARFlow-V in JAX: train, sample, convert, benchmark.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parser(sub)
    info.add_parser(sub)
    parity.add_parser(sub)
    nll.add_parser(sub)
    sample.add_parser(sub)
    bench.add_parser(sub)
    convert.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"starflow-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
