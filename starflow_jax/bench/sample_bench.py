"""``starflow-jax bench sample``: sequential and Jacobi sampling, timed after compilation,
with network passes and the Jacobi-vs-sequential difference; the PyTorch reference's
own sampling of the same weights and noise in the same run when a checkout is given."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.bench.common import (
    bench_argv,
    bench_setting,
    benchmark_model,
    print_table,
    reference_child_output,
    reference_rows_in_child,
    timed,
    write_json,
)
from starflow_jax.bench.matmul_floor import sampling_dense_flops
from starflow_jax.config import load_config, model_config
from starflow_jax.sampling import SamplingOptions, sample

COLUMNS = [
    ("impl", "impl", "s"),
    ("mode", "mode", "s"),
    ("guidance", "guidance", ".1f"),
    ("jacobi_th", "jacobi_th", ".0e"),
    ("batch", "batch", "d"),
    ("seconds", "seconds", ".3f"),
    ("compile_seconds", "compile_s", ".2f"),
    ("passes", "passes", "d"),
    ("dense_gflops_per_s", "dense_GFLOP/s", ".0f"),
    ("max_abs_diff_vs_sequential", "max_abs_diff", ".2e"),
    ("rel_rms_diff_vs_sequential", "rel_rms_diff", ".2e"),
]


def add_parser(sub):
    p = sub.add_parser("sample", help="time sequential and Jacobi sampling (and the reference's)")
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--reference", help="checkout of apple/ml-starflow: also time its sampling (torch needed)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", help="write the rows to this JSON file")
    p.set_defaults(func=run)
    return p


def _diffs(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref))), float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref**2)))


def run(args) -> int:
    config = load_config(args.config, args.overrides)
    cfg = model_config(config)
    batch = args.batch or int(bench_setting(config, "batch", 8))
    repeats = args.repeats or int(bench_setting(config, "repeats", 5))
    guidance = float(bench_setting(config, "guidance", 2.0)) if cfg.txt_dim > 0 else 0.0
    bs = int(bench_setting(config, "jacobi_block_size", 16))
    th = float(bench_setting(config, "jacobi_th", 1e-3))
    tight = float(bench_setting(config, "tight_jacobi_th", 1e-6))
    max_iter = int(bench_setting(config, "jacobi_max_iter", 32))
    seed = int(bench_setting(config, "seed", 0))
    model = benchmark_model(cfg, seed, float(bench_setting(config, "proj_out_std", 0.02)))

    k1, k2, k3 = jax.random.split(jax.random.key(seed + 7), 3)
    shape = (batch, cfg.in_channels, cfg.img_size, cfg.img_size)
    noise = jax.random.normal(k1, shape, jnp.float32)
    y = y_null = None
    if cfg.txt_dim > 0:
        y = jax.random.normal(k2, (batch, cfg.txt_size, cfg.txt_dim), jnp.float32)
        y_null = jnp.zeros_like(y)

    settings = []
    for g in [0.0, guidance] if guidance > 0 else [0.0]:
        settings.append(("sequential", g, None))
        settings.append(("jacobi", g, th))
        settings.append(("jacobi", g, tight))

    if reference_child_output():  # the child that times only the reference (bench.common)
        write_json(
            reference_child_output(),
            _reference_rows(args.reference, cfg, model, noise, y, y_null, settings, bs, max_iter, batch, repeats),
        )
        return 0
    rows = []
    seq_out = {}
    print(
        f"config {args.config}: batch {batch}, {cfg.num_blocks} blocks {list(cfg.layers_per_block)}, "
        f"{cfg.seq_side**2} tokens, Jacobi block {bs}, max_iter {max_iter}; median of {repeats} runs"
    )
    for mode, g, jth in settings:
        y_in = None if y is None else (jnp.concatenate([y, y_null]) if g > 0 else y)
        opts = SamplingOptions(
            guidance=g,
            jacobi=mode == "jacobi",
            jacobi_block_size=bs,
            jacobi_th=jth if jth is not None else th,
            jacobi_max_iter=max_iter,
        )
        first, med, (x, passes) = timed(lambda: sample(model, noise, y_in, opts, return_passes=True), repeats)
        dense = sampling_dense_flops(cfg, shape, passes, bs if mode == "jacobi" else 1, g)
        row = dict(
            impl="jax",
            mode=mode,
            guidance=g,
            jacobi_th=jth,
            batch=batch,
            seconds=med,
            compile_seconds=max(first - med, 0.0),
            passes=int(sum(passes)),
            passes_per_block=passes,
            dense_flops=dense,
            dense_flops_per_s=dense / med,
            dense_gflops_per_s=dense / med / 1e9,
        )
        if mode == "sequential":
            seq_out[g] = np.asarray(x)
        row["max_abs_diff_vs_sequential"], row["rel_rms_diff_vs_sequential"] = _diffs(x, seq_out[g])
        rows.append(row)

    if args.reference:
        # same seeded weights and noise, in a child process (bench.common)
        rows += reference_rows_in_child(bench_argv("sample", args, "--batch", str(batch), "--repeats", str(repeats)))

    print_table(rows, COLUMNS)
    if args.reference:
        for r in rows:
            if r["impl"] != "torch":
                continue
            mine = [
                m
                for m in rows
                if m["impl"] == "jax"
                and m["mode"] == r["mode"]
                and m["guidance"] == r["guidance"]
                and m["jacobi_th"] == r["jacobi_th"]
            ][0]
            print(
                f"speedup jax vs torch, {r['mode']:<10} guidance {r['guidance']:.1f} th {r['jacobi_th']}: "
                f"{r['seconds'] / mine['seconds']:.1f}x"
            )
            if r["passes"] == mine["passes"]:
                target = 3 if r["mode"] == "jacobi" else 5  # the targets
                print(
                    f"  {target}x the reference = {r['seconds'] / target:.3f} s: the dense projections alone "
                    f"({mine['dense_flops'] / 1e9:.1f} GFLOP) would run at "
                    f"{mine['dense_flops'] * target / r['seconds'] / 1e9:.0f} GFLOP/s"
                )
    for r in rows:
        if r["mode"] == "jacobi":
            seq = [
                s
                for s in rows
                if s["impl"] == r["impl"] and s["mode"] == "sequential" and s["guidance"] == r["guidance"]
            ][0]
            r["passes_fraction_of_sequential"] = r["passes"] / seq["passes"]
    write_json(args.json, rows)
    return 0


def _reference_rows(path, cfg, model, noise, y, y_null, settings, bs, max_iter, batch, repeats):
    import torch

    from starflow_jax.bench.reference import count_passes, ensure_process_group, import_reference, reference_model

    tf = import_reference(path)
    ensure_process_group()
    ref = reference_model(tf, cfg, nnx.state(model, nnx.Param))
    counter = count_passes(ref)
    noise_t = torch.from_numpy(np.asarray(noise))
    y_t = None if y is None else torch.from_numpy(np.asarray(y))
    yn_t = None if y_null is None else torch.from_numpy(np.asarray(y_null))
    rows, seq_out = [], {}
    for mode, g, jth in settings:
        y_in = None if y_t is None else (torch.cat([y_t, yn_t]) if g > 0 else y_t)
        kw = dict(reverse=True, guidance=g)
        if mode == "jacobi":
            kw.update(jacobi=True, jacobi_block_size=bs, jacobi_th=jth, jacobi_max_iter=max_iter)
        times = []
        with torch.no_grad():
            for _ in range(repeats):
                counter["passes"] = 0
                t = time.perf_counter()
                x = ref(noise_t, y_in, **kw)
                times.append(time.perf_counter() - t)
        x = x.numpy()
        row = dict(
            impl="torch",
            mode=mode,
            guidance=g,
            jacobi_th=jth,
            batch=batch,
            seconds=float(np.median(times)),
            compile_seconds=None,
            passes=int(counter["passes"]),
        )
        if mode == "sequential":
            seq_out[g] = x
        row["max_abs_diff_vs_sequential"], row["rel_rms_diff_vs_sequential"] = _diffs(x, seq_out[g])
        rows.append(row)
    return rows
