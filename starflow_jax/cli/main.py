"""The ``starflow-jax`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from starflow_jax.bench import plan as plan_cmd
from starflow_jax.cli import bench, convert, evaluate, finetune_decoder, info, nll, parity, precompute, sample, train
from starflow_jax.parallel.host_memory import keep_freed_host_memory

DEBUG_ENV = "STARFLOW_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starflow-jax",
        description="STARFlow / STARFlow-V in JAX: train, sample, evaluate, convert, precompute, benchmark.",
        epilog=f"Errors are reported in one line; --debug (anywhere on the command line) or {DEBUG_ENV}=1 shows the "
        "traceback instead.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parser(sub)
    info.add_parser(sub)
    parity.add_parser(sub)
    nll.add_parser(sub)
    sample.add_parser(sub)
    evaluate.add_parser(sub)
    bench.add_parser(sub)
    convert.add_parsers(sub)
    precompute.add_parser(sub)
    finetune_decoder.add_parser(sub)
    plan_cmd.add_parser(sub)
    return parser


def config_flags_to_overrides(argv: list[str]) -> list[str]:
    """ml-collections style ``--config.a.b=value`` (or ``--config.a.b value``) to ``--set a.b=value``."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.") and len(arg) > len("--config."):
            key = arg[len("--config.") :]
            if "=" not in key:
                if i + 1 >= len(argv):
                    raise SystemExit(f"starflow-jax: {arg} needs a value")
                key, i = f"{key}={argv[i + 1]}", i + 1
            out += ["--set", key]
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        # the `starflow-jax` process itself (not a caller's process): keep freed host memory
        # before JAX's first computation, so XLA:CPU's per-step temporaries do not page-fault
        # (parallel.host_memory)
        keep_freed_host_memory()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    args = parser.parse_args(config_flags_to_overrides([a for a in argv if a != "--debug"]))
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"starflow-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        # the errors that name a problem of the input, the files or the run: one line each
        if debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"starflow-jax {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - anything else: still one line, the traceback on request
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(
            f"starflow-jax {args.command}: error: {type(e).__name__}: {first} (an unexpected error: run with "
            f"--debug or {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
