"""The sampling settings that ``sample`` and ``eval`` share: one argument block, one place
that turns it into ``SamplingOptions``."""

from __future__ import annotations

import argparse

from starflow_jax.sampling import block_policies as block_policies_mod
from starflow_jax.sampling.invert import JACOBI_INITS
from starflow_jax.sampling.sampler import SamplingOptions


def add_arguments(p) -> None:
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance weight (0: off)")
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="prior noise scale (0: every token at its mode given the ones before)",
    )
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
        choices=JACOBI_INITS,
        default="noise",
        help="the first iterate of tokens not yet sampled: the prior noise (the reference's), zeros, or (adaptive, "
        "video) the token one frame earlier",
    )
    p.add_argument(
        "--jacobi-blocks",
        default=None,
        help='one policy per flow block, deep block first, e.g. "adaptive,window=64,th=0.01; blockwise; sequential" '
        "(sampling.block_policies; overrides --jacobi*; default: the workdir config's sample.jacobi_blocks, "
        "as `bench jacobi --propose --save` writes it, else none)",
    )
    p.add_argument("--jacobi-block-size", type=int, default=32)
    p.add_argument("--jacobi-th", type=float, default=1e-3)
    p.add_argument("--jacobi-max-iter", type=int, default=32)


def check(args) -> None:
    """The checks that need no model (run before one is loaded)."""
    if args.cfg < 0:
        raise ValueError(f"--cfg must be >= 0, got {args.cfg}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")


def block_policies(args, config=None) -> tuple:
    """``--jacobi-blocks``, else the run config's ``sample.jacobi_blocks`` (logged), else ``()``."""
    if args.jacobi_blocks is not None:
        return block_policies_mod.parse(args.jacobi_blocks)
    saved = str(config.get("sample", {}).get("jacobi_blocks", "") or "") if config is not None else ""
    if saved:
        print(f"sampling policies per block from the run's config (sample.jacobi_blocks): {saved}")
    return block_policies_mod.parse(saved)


def options(args, config=None, **extra) -> SamplingOptions:
    """``SamplingOptions`` from the arguments of ``add_arguments`` (plus a command's own
    ``extra`` fields); ``config``: the run's, whose ``sample.jacobi_blocks`` applies when
    ``--jacobi-blocks`` is not given."""
    check(args)
    return SamplingOptions(
        jacobi_blocks=block_policies(args, config),
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
