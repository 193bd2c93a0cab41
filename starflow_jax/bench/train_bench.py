"""``starflow-jax bench train``: the training step timed after compilation, its model
FLOPs (analytic, ``bench.flops``), achieved FLOP/s and MFU against the matmul peak that
the command measures itself, memory and compile time; with ``--reference``, the PyTorch
reference's own step (forward, loss, backward, clipping, AdamW) on the same
configuration, weights and batch in the same run; with ``--matmul-floor``, the step's
dense matmuls alone (``bench.matmul_floor``), the floor of the step time."""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
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
from starflow_jax.bench.flops import train_step_flops
from starflow_jax.config import load_config, model_config
from starflow_jax.config.training import SECTIONS
from starflow_jax.layers.attention import resolve_attention
from starflow_jax.parallel.mesh import make_mesh
from starflow_jax.train.program import build_program

COLUMNS = [
    ("impl", "impl", "s"),
    ("dtype", "dtype", "s"),
    ("remat", "remat", "s"),
    ("batch", "batch", "d"),
    ("seconds_per_step", "s/step", ".4f"),
    ("compile_seconds", "compile_s", ".2f"),
    ("tokens_per_s", "tokens/s", ".0f"),
    ("flops_per_step", "GFLOP/step", ".3g"),
    ("flops_per_s", "GFLOP/s", ".4g"),
    ("mfu", "MFU", ".1%"),
    ("peak_memory_mb", "mem_MB", ".0f"),
]


def add_parser(sub):
    p = sub.add_parser("train", help="time the training step (FLOPs, MFU, memory), and the reference's")
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--reference", help="checkout of apple/ml-starflow: also time its training step (torch needed)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps after compilation (median reported)")
    p.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul that measures the peak")
    p.add_argument(
        "--remat",
        default=None,
        help="rematerialisation policy of the JAX step (none, full, dots, "
        "dots_all; default: the config's train.remat or none)",
    )
    p.add_argument(
        "--matmul-floor",
        action="store_true",
        help="also time the step's dense matmuls alone (bench.matmul_floor): the floor of the step time",
    )
    p.add_argument(
        "--trajectory",
        type=int,
        default=None,
        metavar="N",
        help="instead of timing: N updates of this project's training program and of the reference's train.py "
        "step (--reference) from the same weights, batches and random draws, compared after every update "
        "(bench.train_trajectory)",
    )
    p.add_argument(
        "--quality",
        action="store_true",
        help="instead of timing: train the digits model with this project's program and the reference's train.py "
        "step (--reference) from the same start; held-out bits/dim and training seconds at --quality-steps, "
        "side by side (bench.train_quality)",
    )
    p.add_argument("--quality-steps", default="500,1000,2000,3000", help="--quality: the steps to evaluate at")
    p.add_argument("--budget", type=float, default=None, help="--quality: train each side for this many seconds")
    p.add_argument("--plot", help="--quality: write a PNG of both curves (bits/dim against training seconds)")
    p.add_argument("--trajectory-inputs", help=argparse.SUPPRESS)  # the reference's child: the JAX side's inputs
    p.add_argument("--json", help="write the rows to this JSON file")
    p.set_defaults(func=run)
    return p


def matmul_peak(dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted ``n x n @ n x n`` matmul in ``dtype`` on the default device
    (best of ``repeats`` after compilation)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def bench_training_config(config, batch: int, seed: int, lr: float, clip: float, noise_std: float, remat: str | None):
    """``config`` as a training config (sections it lacks take their defaults) with the timed
    step's settings: ``batch``, a constant ``lr``, ``clip``, ``noise_std``, ``remat`` (None:
    the config's), no EMA, no accumulation."""
    config = config.copy_and_resolve_references()
    for name, defaults in SECTIONS.items():
        config[name] = ml_collections.ConfigDict({**defaults, **(config[name].to_dict() if name in config else {})})
    config.train.update(
        batch_size=batch,
        seed=seed,
        lr=lr,
        min_lr=lr,
        warmup_steps=0,
        b1=0.9,
        b2=0.95,
        weight_decay=1e-4,
        grad_clip=clip,
        grad_skip=False,
        noise_type="gaussian",
        noise_std=noise_std,
        drop_label=0.0,
        ema_decay=0.0,
        grad_accum=1,
        latent_norm_regularization=0.0,
        remat=remat or config.train.remat,
    )
    return config


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(args) -> int:
    if args.trajectory is not None:
        from starflow_jax.bench import train_trajectory

        return train_trajectory.run(args)
    if args.quality:
        from starflow_jax.bench import train_quality

        return train_quality.run(args)
    config = load_config(args.config, args.overrides)
    cfg = model_config(config)
    batch = args.batch or int(bench_setting(config, "batch", 8))
    steps = args.steps or int(bench_setting(config, "train_steps", 10))
    seed = int(bench_setting(config, "seed", 0))
    lr, clip, noise_std = 1e-4, 1.0, 0.3
    model = benchmark_model(cfg, seed, float(bench_setting(config, "proj_out_std", 0.02)))
    shape = (batch, cfg.in_channels, cfg.img_size, cfg.img_size)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    y = rng.normal(size=(batch, cfg.txt_size, cfg.txt_dim)).astype(np.float32) if cfg.txt_dim > 0 else None
    tokens = batch * (cfg.img_size // cfg.patch_size) ** 2
    flops = train_step_flops(cfg, shape)
    dtype = jnp.dtype(cfg.dtype)
    if reference_child_output():  # the child that times only the reference (bench.common)
        weights = jax.device_get(nnx.state(model, nnx.Param))
        write_json(
            reference_child_output(),
            [_reference_row(args.reference, cfg, weights, x, y, batch, steps, lr, clip, noise_std, tokens, flops)],
        )
        return 0

    # the training program train builds (train.program) for this config, on this host's devices,
    # with the reference step's recipe: AdamW at a constant lr (b1 0.9, b2 0.95, weight decay
    # 1e-4), gradient clipping, Gaussian noise added in the step
    config = bench_training_config(config, batch, seed, lr, clip, noise_std, args.remat)
    program = build_program(config, make_mesh(dict(config.mesh)), num_classes=0)
    remat = program.hp.remat
    state = program.init_state(nnx.state(model, nnx.Param))
    data = dict(image=jnp.asarray(x)) | ({} if y is None else dict(cond=jnp.asarray(y)))
    data = jax.device_put(data, program.batch_shardings(data))
    t = time.perf_counter()
    with jax.set_mesh(program.mesh):
        compiled = program.lower(state, data).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    state, m = compiled(state, data)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    peak = matmul_peak(dtype, args.peak_size)
    compiled_mb = (
        None
        if mem is None
        else (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        / 2**20
    )
    print(
        f"config {args.config}: batch {batch}, {cfg.num_blocks} blocks {list(cfg.layers_per_block)}, "
        f"{tokens // batch} tokens, {cfg.dtype}, attention {cfg.attention_impl} -> kernel "
        f"{resolve_attention(cfg.attention_impl)}; median of {steps} steps; device {jax.devices()[0].device_kind}; "
        f"{jax.default_backend()} {cfg.dtype} matmul peak ({args.peak_size}^3): {peak / 1e9:.1f} GFLOP/s"
    )
    rows = [
        dict(
            impl="jax",
            dtype=cfg.dtype,
            remat=remat,
            attention_kernel=resolve_attention(cfg.attention_impl),
            batch=batch,
            seconds_per_step=sec,
            compile_seconds=compile_s,
            tokens_per_s=tokens / sec,
            flops_per_step=flops,
            flops_per_s=flops / sec,
            mfu=flops / sec / peak,
            peak_memory_mb=compiled_mb,
            loss=float(m["loss"]),
        )
    ]
    if args.matmul_floor:
        rows.append(_floor_row(cfg, shape, dtype, steps, peak, tokens))
    if args.reference:  # same seeded weights and batch, in a child process (bench.common)
        (ref,) = reference_rows_in_child(bench_argv("train", args, "--batch", str(batch), "--steps", str(steps)))
        rows.append(dict(ref, mfu=ref["flops_per_s"] / peak))
    shown = [dict(r, flops_per_step=r["flops_per_step"] / 1e9, flops_per_s=r["flops_per_s"] / 1e9) for r in rows]
    print_table(shown, COLUMNS)
    print(
        f"jax compiled memory (arguments + outputs + temporaries): {compiled_mb:.0f} MB; "
        f"process peak RSS {_peak_rss_mb():.0f} MB"
    )
    torch_row = next((r for r in rows if r["impl"] == "torch"), None)
    if torch_row:
        print(f"speedup jax vs torch: {torch_row['seconds_per_step'] / sec:.2f}x")
    floor = next((r for r in rows if r["impl"] == "jax-matmuls"), None)
    if floor:
        print(
            f"the step's dense matmuls alone ({floor['flops_per_step'] / 1e9:.1f} of {flops / 1e9:.1f} GFLOP; no "
            f"attention, norms, activations, optimiser): {floor['seconds_per_step']:.3f} s at "
            f"{floor['mfu']:.1%} of the matmul peak"
        )
        if torch_row:
            print(f"1.3x the reference's step: {torch_row['seconds_per_step'] / 1.3:.3f} s")
    write_json(args.json, rows)
    return 0


def _floor_row(cfg, shape, dtype, steps, peak, tokens):
    from starflow_jax.bench import matmul_floor

    shapes = matmul_floor.chain_shapes(cfg, shape)
    params = matmul_floor.init_chain(shapes, dtype)
    t = time.perf_counter()
    compiled = matmul_floor.chain_step().lower(params).compile()
    compile_s = time.perf_counter() - t
    _, sec, _ = timed(lambda: compiled(params), steps)
    flops = matmul_floor.chain_flops(shapes)
    return dict(
        impl="jax-matmuls",
        dtype=str(jnp.dtype(dtype)),
        remat="none",
        batch=shape[0],
        seconds_per_step=sec,
        compile_seconds=compile_s,
        tokens_per_s=tokens / sec,
        flops_per_step=flops,
        flops_per_s=flops / sec,
        mfu=flops / sec / peak,
        peak_memory_mb=None,
    )


def _reference_row(path, cfg, weights, x, y, batch, steps, lr, clip, noise_std, tokens, flops):
    import torch

    from starflow_jax.bench.reference import import_reference, reference_model

    tf = import_reference(path)
    ref = reference_model(tf, cfg, weights).train()
    params = [p for k, p in ref.named_parameters() if p.requires_grad and not k.startswith("learnable_self_denoiser")]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=1e-4)
    xt = torch.from_numpy(x)
    yt = None if y is None else torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)

    def one_step():
        xn = xt + noise_std * torch.randn(xt.shape, generator=gen)
        opt.zero_grad(set_to_none=True)
        z, _, _, logdets = ref(xn, yt)
        loss = ref.get_loss(z, logdets)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return float(loss)

    one_step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = one_step()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    return dict(
        impl="torch",
        dtype=str(cfg.dtype),
        batch=batch,
        seconds_per_step=sec,
        compile_seconds=None,
        tokens_per_s=tokens / sec,
        flops_per_step=flops,
        flops_per_s=flops / sec,
        peak_memory_mb=None,
        loss=loss,
        threads=torch.get_num_threads(),
    )
