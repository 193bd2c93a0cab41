"""``starflow-jax train``: train a configuration in a workdir (resumes the latest checkpoint)."""
from __future__ import annotations

from starflow_jax.config import load_config


def add_parser(sub):
    p = sub.add_parser("train", help="train a model (digits by default); resumes from the workdir's latest checkpoint")
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=500")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, samples.png, result.json")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run in the workdir")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from starflow_jax.train.loop import train

    config = load_config(args.config, args.overrides)
    for section in ("data", "train", "sample"):
        if section not in config:
            raise ValueError(f"config {args.config} has no '{section}' section: it is not a training config")
    train(config, args.workdir, overwrite=args.overwrite)
    return 0
