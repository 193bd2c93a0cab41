"""``starflow-jax sample``: draw samples and write them as a picture (PNG grid, or GIF for video)."""
from __future__ import annotations

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from starflow_jax.cli import model_source
from starflow_jax.sampling import SamplingOptions, sample
from starflow_jax.sampling.denoise import denoise
from starflow_jax.sampling.visualize import grid, save_gif, save_mp4, save_png, to_uint8


def add_parser(sub):
    p = sub.add_parser("sample", help="sample from a model and write a PNG grid (GIF or MP4 for video)")
    model_source.add_arguments(p, allow_random=True)
    p.add_argument("--out", required=True,
                   help="output picture: .png (grid; video frames side by side), .gif or .mp4 (video frames)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --save-npy) if it exists")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of a .gif / .mp4")
    p.add_argument("--num", type=int, default=16, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", help="class labels, comma separated (cycled over --num); null class = the last index")
    p.add_argument("--cond", help=".npy of conditioning embeddings (num, txt_size, txt_dim)")
    p.add_argument("--cond-null", help=".npy of the null conditioning (txt_size, txt_dim); default zeros")
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance weight (0: off)")
    p.add_argument("--attn-temp", type=float, default=1.0)
    p.add_argument("--jacobi", action=__import__("argparse").BooleanOptionalAction, default=False,
                   help="Jacobi iteration instead of sequential inversion")
    p.add_argument("--jacobi-block-size", type=int, default=32)
    p.add_argument("--jacobi-th", type=float, default=1e-3)
    p.add_argument("--jacobi-max-iter", type=int, default=32)
    p.add_argument("--unroll-layers", action=__import__("argparse").BooleanOptionalAction, default=None,
                   help="unroll the layers inside the token loop (default: on the CPU only)")
    p.add_argument("--cache-segments", type=int, default=2,
                   help="sequential sampling with unrolled layers: token-loop segments, each reading only "
                        "the KV cache written so far")
    p.add_argument("--num-frames", type=int, default=None, help="frames of a video sample (video models)")
    p.add_argument("--noise-std", type=float, default=None,
                   help="training noise level for the denoising step (default: config.train.noise_std, else none)")
    p.add_argument("--no-denoise", action="store_true", help="skip the denoising step")
    p.add_argument("--pixel-space", action="store_true",
                   help="show samples as [-1, 1] pixels (default: when in_channels is 1 or 3)")
    p.add_argument("--scale", type=int, default=1, help="integer upscaling of the written picture")
    p.add_argument("--save-npy", help="also save the raw samples to this .npy")
    p.set_defaults(func=run)
    return p


def _progress(i: int, n: int, t0: float):
    bar = "#" * i + "." * (n - i)
    print(f"\rsampling blocks [{bar}] {i}/{n} {time.time() - t0:6.1f}s", end="" if i < n else "\n",
          file=sys.stderr, flush=True)


def _conditioning(args, cfg, num: int):
    if cfg.txt_dim == 0:
        if args.labels or args.cond or args.cfg > 0:
            raise ValueError("the model is unconditional (txt_dim=0): --labels, --cond and --cfg do not apply")
        return None
    if bool(args.labels) == bool(args.cond):
        raise ValueError(f"the model is conditioned (txt_size={cfg.txt_size}, txt_dim={cfg.txt_dim}): "
                         "give exactly one of --labels or --cond")
    if args.labels:
        if cfg.txt_size != 1:
            raise ValueError(f"--labels needs a label-conditioned model (txt_size=1), this one has txt_size={cfg.txt_size}")
        try:
            labels = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError as e:
            raise ValueError(f"--labels must be comma-separated integers, got {args.labels!r}") from e
        if not labels or min(labels) < 0 or max(labels) >= cfg.txt_dim - 1:
            raise ValueError(f"labels must lie in [0, {cfg.txt_dim - 1}) (index {cfg.txt_dim - 1} is the null class)")
        from starflow_jax.train.objective import one_hot_labels

        idx = jnp.asarray(np.resize(np.asarray(labels), num))
        y = np.asarray(one_hot_labels(idx, cfg.txt_dim - 1))
        y_null = np.asarray(one_hot_labels(-jnp.ones_like(idx), cfg.txt_dim - 1))
    else:
        y = np.load(args.cond).astype(np.float32)
        if y.ndim != 3 or y.shape[1:] != (cfg.txt_size, cfg.txt_dim):
            raise ValueError(f"--cond has shape {y.shape}, expected (num, {cfg.txt_size}, {cfg.txt_dim})")
        if y.shape[0] < num:
            raise ValueError(f"--cond holds {y.shape[0]} rows, --num asks for {num}")
        y = y[:num]
        y_null = np.zeros_like(y)
        if args.cond_null:
            yn = np.load(args.cond_null).astype(np.float32)
            if yn.shape != (cfg.txt_size, cfg.txt_dim):
                raise ValueError(f"--cond-null has shape {yn.shape}, expected ({cfg.txt_size}, {cfg.txt_dim})")
            y_null = np.broadcast_to(yn[None], y.shape)
    if not np.all(np.isfinite(y)):
        raise ValueError("the conditioning holds NaN or Inf values")
    return jnp.asarray(y), jnp.asarray(y_null)


def run(args) -> int:
    out = pathlib.Path(args.out)
    if out.suffix.lower() not in (".png", ".gif", ".mp4"):
        raise ValueError(f"--out must end in .png, .gif or .mp4, got {out.name}")
    for path in [out] + ([pathlib.Path(args.save_npy)] if args.save_npy else []):
        if path.exists() and not args.overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
    if args.fps <= 0:
        raise ValueError(f"--fps must be > 0, got {args.fps}")
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.cfg < 0:
        raise ValueError(f"--cfg must be >= 0, got {args.cfg}")
    config, model = model_source.load_model(args, seed=args.seed)
    cfg = model.cfg
    cond = _conditioning(args, cfg, args.num)
    shape = (args.num, cfg.in_channels, cfg.img_size, cfg.img_size)
    if args.num_frames:
        shape = (args.num, args.num_frames) + shape[1:]
    elif cfg.is_video:
        raise ValueError("a video model needs --num-frames")
    if len(shape) == 4 and out.suffix.lower() != ".png":
        raise ValueError(f"image samples are written as a .png grid, not {out.suffix}")
    noise = jax.random.normal(jax.random.key(args.seed), shape, jnp.float32)
    y = None
    if cond is not None:
        y = jnp.concatenate(cond, axis=0) if args.cfg > 0 else cond[0]
    opts = SamplingOptions(guidance=args.cfg, attn_temp=args.attn_temp, jacobi=args.jacobi,
                           jacobi_block_size=args.jacobi_block_size, jacobi_th=args.jacobi_th,
                           jacobi_max_iter=args.jacobi_max_iter, unroll_layers=args.unroll_layers,
                           cache_segments=args.cache_segments)
    t0 = time.time()
    x, passes = sample(model, noise, y, opts, on_block=lambda i, n: _progress(i, n, t0), return_passes=True)
    noise_std = args.noise_std
    if noise_std is None and "train" in config and "noise_std" in config.train:
        noise_std = float(config.train.noise_std)
    if noise_std and not args.no_denoise:
        x = denoise(model, x, None if cond is None else cond[0], noise_std=noise_std)
    x = np.asarray(jax.device_get(x))
    if not np.all(np.isfinite(x)):
        raise ValueError("sampling produced NaN or Inf values")
    pixel = args.pixel_space or cfg.in_channels in (1, 3)
    if x.ndim == 5:
        frames = [grid(to_uint8(x[:, t], pixel)) for t in range(x.shape[1])]
        if out.suffix.lower() == ".gif":
            save_gif(out, frames, fps=args.fps, scale=args.scale)
        elif out.suffix.lower() == ".mp4":
            save_mp4(out, frames, fps=args.fps, scale=args.scale)
        else:
            save_png(out, np.concatenate(frames, axis=1), scale=args.scale)
    else:
        save_png(out, grid(to_uint8(x, pixel)), scale=args.scale)
    if args.save_npy:
        np.save(args.save_npy, x)
    print(f"wrote {out} ({args.num} samples, {'jacobi' if args.jacobi else 'sequential'}, "
          f"network passes per block {passes}, {time.time() - t0:.1f}s)")
    return 0
