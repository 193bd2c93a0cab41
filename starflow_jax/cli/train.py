"""``starflow-jax train``: train a configuration in a workdir (resumes the latest checkpoint)."""

from __future__ import annotations

import os
import sys

from starflow_jax.cli import processes
from starflow_jax.config import check_training_config, load_config
from starflow_jax.train.termination import EXIT_CODE


def add_parser(sub):
    p = sub.add_parser("train", help="train a model (digits by default); resumes from the workdir's latest checkpoint")
    p.add_argument("--config", required=True)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=500",
    )
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, samples.png, result.json")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run in the workdir")
    p.add_argument(
        "--step",
        type=int,
        default=None,
        help="resume from this checkpoint step (default: the newest readable one); newer checkpoints "
        "are moved to WORKDIR/checkpoints_set_aside, not deleted",
    )
    p.add_argument(
        "--init-from",
        metavar="WORKDIR",
        default=None,
        help="fine-tune: start a fresh run from this workdir's parameters (a training run, or reference "
        "weights imported with `starflow-jax import`) with a new optimizer",
    )
    p.add_argument("--init-step", type=int, default=None, help="with --init-from: its checkpoint step (default latest)")
    p.add_argument("--init-ema", action="store_true", help="with --init-from: its EMA parameters")
    processes.add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    # Before anything touches the JAX devices (the train loop builds the mesh from them).
    info = processes.initialize(args, log=lambda m: print(m, flush=True))

    from starflow_jax.train.loop import train

    config = load_config(args.config, args.overrides)
    try:
        check_training_config(config)
    except ValueError as e:
        raise ValueError(f"config {args.config}: {e}") from None
    if (args.init_step is not None or args.init_ema) and not args.init_from:
        raise ValueError("--init-step / --init-ema need --init-from")
    result = train(
        config,
        args.workdir,
        overwrite=args.overwrite,
        init_from=args.init_from,
        init_step=args.init_step,
        init_ema=args.init_ema,
        step=args.step,
    )
    if result.get("reason") == "SIGTERM":
        if info.is_multiprocess:
            # skip the distributed runtime's shutdown, which waits (minutes) for processes that may be gone
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_CODE)
        return EXIT_CODE
    return 0
