"""``starflow-jax info``: build a configuration abstractly and print its parameter counts."""

from __future__ import annotations

import json

from starflow_jax.config import load_config, model_config
from starflow_jax.model.summary import parameter_counts


def add_parser(sub):
    p = sub.add_parser("info", help="print the parameter counts of a configuration (nothing is allocated)")
    p.add_argument("--config", required=True, help="config file: configs/*.py (ml-collections) or a reference .yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.channels=128 (repeatable)",
    )
    p.add_argument("--json", help="also write the counts to this JSON file")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    config = load_config(args.config, args.overrides)
    cfg = model_config(config)
    counts = parameter_counts(cfg)
    print(f"config: {args.config}")
    print(
        f"latent: {cfg.in_channels} x {cfg.img_size} x {cfg.img_size}, patch {cfg.patch_size} -> "
        f"{cfg.seq_side**2} tokens of {cfg.patch_dim}; text {cfg.txt_size} x {cfg.txt_dim}"
    )
    print(f"{'block':>5}  {'role':<8}{'layers':>7}{'width':>7}  {'order':<9}{'text':<6}{'parameters':>16}")
    for r in counts["blocks"]:
        print(
            f"{r['block']:>5}  {r['role']:<8}{r['layers']:>7}{r['channels']:>7}  {r['order']:<9}"
            f"{('yes' if r['conditioned'] else 'no'):<6}{r['params']:>16,}"
        )
    if cfg.learnable_self_denoiser:
        print(
            f"{'':>5}  {'denoiser':<8}{cfg.denoiser_layers:>7}{cfg.channels:>7}  {'-':<9}"
            f"{('yes' if cfg.conditional_denoiser else 'no'):<6}{counts['denoiser']:>16,}"
        )
    print(f"flow blocks: {counts['flow']:,}")
    print(f"denoiser: {counts['denoiser']:,}")
    print(f"total: {counts['total']:,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=str(args.config), model=cfg.to_dict(), **counts), f, indent=2)
    return 0
