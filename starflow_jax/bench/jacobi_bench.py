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
from starflow_jax.bench.jacobi_calibration import SEQUENTIAL, Measured, propose, save_proposal
from starflow_jax.cli import model_source
from starflow_jax.evaluate import quality
from starflow_jax.sampling import SamplingOptions, block_policies, sample
from starflow_jax.sampling.block_policies import BlockPolicy

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
    p.add_argument(
        "--propose",
        action="store_true",
        help="also measure every block alone under each policy and propose one policy per block: the fewest "
        "passes within --budget",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="the proposal's error budget (rel. RMS against sequential; default: the block-wise schedule's error)",
    )
    p.add_argument(
        "--save", action="store_true", help="write the proposal into --workdir's config (sample.jacobi_blocks)"
    )
    p.add_argument("--json", help="write the rows to this JSON file")
    p.set_defaults(func=run)
    return p


def _rel_rms(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref**2)))


def _conditioning(config, cfg, num: int):
    """Labels spread over the classes, or a text-conditioned model's held-out (else training)
    records' embeddings (the workdir's data)."""
    if cfg.txt_dim > 0 and cfg.txt_size > 1:
        if "data" not in config:
            raise ValueError("a text-conditioned model: give --workdir of a run, whose data gives the conditioning")
        from starflow_jax.data.sources import make_data

        data = make_data(config)
        return quality.record_conditioning(data.heldout if data.heldout is not None else data.train)
    return quality.label_conditioning(cfg, quality.class_labels(cfg, num))


def _candidates(args, inits: list[str], video: bool) -> list[BlockPolicy]:
    """The policies tried on each block by ``--propose``."""
    out = [SEQUENTIAL, BlockPolicy("blockwise", window=args.block_size, th=args.th, max_iter=args.max_iter)]
    for w, th, init in itertools.product(_ints(args.windows), _floats(args.thresholds), inits):
        if init != "previous" or video:
            out.append(BlockPolicy("adaptive", window=w, th=th, init=init))
    return out


def run(args) -> int:
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    inits = [v.strip() for v in args.inits.split(",") if v.strip()]
    guidances = _floats(args.cfg)
    if args.save and not args.propose:
        raise ValueError("--save writes the proposal of --propose: give both")
    if args.save and (len(guidances) != 1 or not args.workdir):
        raise ValueError("--save needs --workdir and one guidance weight (--cfg W): the proposal is made for it")
    if args.budget is not None and not args.budget > 0:
        raise ValueError(f"--budget must be > 0, got {args.budget}")
    config, model = model_source.load_model(args, seed=0)
    cfg = model.cfg
    frames = quality.clip_frames(config) if "data" in config else 0
    shape = (args.num, *((frames,) if frames else ()), cfg.in_channels, cfg.img_size, cfg.img_size)
    noise = jax.random.normal(jax.random.key(args.seed), shape)
    cond = _conditioning(config, cfg, args.num)(0, args.num)
    num_blocks = len(model.blocks)
    rows, proposals = [], []
    for g in guidances:
        y = None if cond is None else (jnp.concatenate([cond.y, cond.y_null]) if g > 0 else cond.y)

        def measure(policies, g=g, y=y):
            x, passes = sample(model, noise, y, SamplingOptions(guidance=g, jacobi_blocks=policies), return_passes=True)
            return x, passes

        seq, passes = sample(model, noise, y, SamplingOptions(guidance=g), return_passes=True)
        rows.append(dict(policy="sequential", guidance=g, passes_per_block=str(passes), passes=sum(passes)))
        settings = [("blockwise", args.block_size, args.th, "noise")]
        settings += [
            ("adaptive", w, th, i)
            for w, th, i in itertools.product(_ints(args.windows), _floats(args.thresholds), inits)
            if i != "previous" or frames
        ]
        blockwise = blockwise_err = None
        for policy, window, th, init in settings:
            x, passes = measure(
                (BlockPolicy(policy, window=window, th=th, max_iter=args.max_iter, init=init),) * num_blocks
            )
            err = _rel_rms(x, seq)
            if blockwise is None:
                blockwise, blockwise_err = sum(passes), err
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
                    rel_rms_vs_sequential=err,
                )
            )
        if not args.propose:
            continue
        budget = args.budget if args.budget is not None else blockwise_err
        per_block = []
        for k in range(num_blocks):
            measured = []
            for cand in _candidates(args, inits, bool(frames)):
                policies = tuple(cand if j == k else SEQUENTIAL for j in range(num_blocks))
                x, passes = measure(policies)
                measured.append(Measured(cand, passes[k], _rel_rms(x, seq)))
            per_block.append(measured)

        def whole(policies, measure=measure, seq=seq):
            x, passes = measure(policies)
            return passes, _rel_rms(x, seq)

        found = propose(per_block, budget, whole)
        if found is None:
            print(f"cfg {g:g}: no combination of the candidates stays within the error budget {budget:.2e}")
            continue
        policies, passes, err = found
        text = block_policies.text(policies)
        proposals.append(dict(guidance=g, budget=budget, jacobi_blocks=text, passes=passes, error=err))
        rows.append(
            dict(
                policy="proposed",
                guidance=g,
                passes_per_block=str(passes),
                passes=sum(passes),
                passes_vs_blockwise=sum(passes) / blockwise,
                rel_rms_vs_sequential=err,
            )
        )
    print_table(rows, COLUMNS)
    for p in proposals:
        print(
            f'proposed (cfg {p["guidance"]:g}, error budget {p["budget"]:.2e}): --jacobi-blocks "{p["jacobi_blocks"]}" '
            f"({sum(p['passes'])} passes, rel. RMS error {p['error']:.2e})"
        )
    if args.save and proposals:
        p = proposals[0]
        saved = save_proposal(
            args.workdir,
            block_policies.parse(p["jacobi_blocks"]),
            dict(guidance=p["guidance"], budget=p["budget"], passes=p["passes"], error=p["error"]),
        )
        print(f"saved to {args.workdir}'s config as sample.jacobi_blocks = {saved!r} (sample and eval use it)")
    write_json(args.json, dict(rows=rows, proposals=proposals) if args.propose else rows)
    return 0
