"""``starflow-jax bench jacobi``: network passes and error of the Jacobi policies on a
trained checkpoint, against sequential decoding of the same noise: the reference's
block-wise schedule and the adaptive window (``sampling.invert.jacobi``) over thresholds
and window sizes, per flow block; a printed table and JSON rows."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from starflow_jax.bench.common import print_table, write_json
from starflow_jax.cli import model_source
from starflow_jax.evaluate import quality
from starflow_jax.sampling import SamplingOptions, sample

COLUMNS = [
    ("policy", "policy", "s"),
    ("guidance", "cfg", ".1f"),
    ("window", "window", "d"),
    ("jacobi_th", "threshold", ".0e"),
    ("init", "init", "s"),
    ("passes_per_block", "passes (deep first)", "s"),
    ("passes", "passes", "d"),
    ("passes_vs_blockwise", "vs blockwise", ".2f"),
    ("rel_rms_vs_sequential", "rel_rms_err", ".2e"),
]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_parser(sub):
    p = sub.add_parser(
        "jacobi", help="passes and error of the Jacobi policies on a checkpoint, against sequential decoding"
    )
    model_source.add_arguments(p, allow_random=True)
    p.add_argument("--num", type=int, default=20, help="samples (labels spread over the classes)")
    p.add_argument("--seed", type=int, default=1, help="the prior noise")
    p.add_argument("--cfg", default="0,2", help="guidance weights, comma-separated")
    p.add_argument("--block-size", type=int, default=16, help="the reference's block-wise chunk size")
    p.add_argument("--th", type=float, default=1e-3, help="the reference's block-wise threshold")
    p.add_argument("--max-iter", type=int, default=32, help="the block-wise iteration cap")
    p.add_argument("--windows", default="16,64", help="adaptive window sizes, comma-separated")
    p.add_argument("--thresholds", default="1e-3,1e-2,1e-1", help="adaptive thresholds, comma-separated")
    p.add_argument("--inits", default="noise", help="adaptive starting points: noise, zeros")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.set_defaults(func=run)
    return p


def _rel_rms(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref**2)))


def run(args) -> int:
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    inits = [v.strip() for v in args.inits.split(",") if v.strip()]
    config, model = model_source.load_model(args, seed=0)
    cfg = model.cfg
    frames = quality.clip_frames(config) if "data" in config else 0
    shape = (args.num, *((frames,) if frames else ()), cfg.in_channels, cfg.img_size, cfg.img_size)
    noise = jax.random.normal(jax.random.key(args.seed), shape)
    cond = quality.label_conditioning(cfg, quality.class_labels(cfg, args.num))(0, args.num)
    rows = []
    for g in _floats(args.cfg):
        y = None if cond is None else (jnp.concatenate([cond.y, cond.y_null]) if g > 0 else cond.y)
        seq, passes = sample(model, noise, y, SamplingOptions(guidance=g), return_passes=True)
        rows.append(dict(policy="sequential", guidance=g, passes_per_block=str(passes), passes=sum(passes)))
        settings = [("blockwise", args.block_size, args.th, "noise")]
        settings += [
            ("adaptive", w, th, i)
            for w, th, i in itertools.product(_ints(args.windows), _floats(args.thresholds), inits)
        ]
        blockwise = None
        for policy, window, th, init in settings:
            opts = SamplingOptions(
                guidance=g,
                jacobi=True,
                jacobi_policy=policy,
                jacobi_block_size=window,
                jacobi_th=th,
                jacobi_max_iter=args.max_iter,
                jacobi_init=init,
            )
            x, passes = sample(model, noise, y, opts, return_passes=True)
            blockwise = blockwise or sum(passes)
            rows.append(
                dict(
                    policy=policy,
                    guidance=g,
                    window=window,
                    jacobi_th=th,
                    init=init,
                    passes_per_block=str(passes),
                    passes=sum(passes),
                    passes_vs_blockwise=sum(passes) / blockwise,
                    rel_rms_vs_sequential=_rel_rms(x, seq),
                )
            )
    print_table(rows, COLUMNS)
    write_json(args.json, rows)
    return 0
