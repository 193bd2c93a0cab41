"""The sampling settings that ``sample`` and ``eval`` share: one argument block, one place
that turns it into ``SamplingOptions``."""

from __future__ import annotations

import argparse

from starflow_jax.sampling.sampler import SamplingOptions


def add_arguments(p) -> None:
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance weight (0: off)")
    p.add_argument("--attn-temp", type=float, default=1.0)
    p.add_argument(
        "--jacobi",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Jacobi iteration instead of sequential inversion",
    )
    p.add_argument(
        "--jacobi-policy",
        choices=("blockwise", "adaptive"),
        default="blockwise",
        help="blockwise: the reference's fixed chunks of --jacobi-block-size tokens; adaptive: a window of that "
        "many tokens advancing past the tokens that stopped changing (never more passes than sequential)",
    )
    p.add_argument(
        "--jacobi-init",
        choices=("noise", "zeros"),
        default="noise",
        help="the first iterate of tokens not yet sampled: the prior noise (the reference's) or zeros",
    )
    p.add_argument("--jacobi-block-size", type=int, default=32)
    p.add_argument("--jacobi-th", type=float, default=1e-3)
    p.add_argument("--jacobi-max-iter", type=int, default=32)


def check(args) -> None:
    """The checks that need no model (run before one is loaded)."""
    if args.cfg < 0:
        raise ValueError(f"--cfg must be >= 0, got {args.cfg}")


def options(args, **extra) -> SamplingOptions:
    """``SamplingOptions`` from the arguments of ``add_arguments`` (plus a command's own
    ``extra`` fields)."""
    check(args)
    return SamplingOptions(
        guidance=args.cfg,
        attn_temp=args.attn_temp,
        jacobi=args.jacobi,
        jacobi_block_size=args.jacobi_block_size,
        jacobi_th=args.jacobi_th,
        jacobi_max_iter=args.jacobi_max_iter,
        jacobi_policy=args.jacobi_policy,
        jacobi_init=args.jacobi_init,
        **extra,
    )
