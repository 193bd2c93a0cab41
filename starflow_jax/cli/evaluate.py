"""``starflow-jax eval``: generate samples in batches and score them (digits FD and class
accuracy for models of the embedded digits; FID and Inception Score with the FID
Inception-v3 weights and a statistics file); a JSON result and a printed table."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np

from starflow_jax.cli import model_source, processes, sampling_args
from starflow_jax.cli.output_paths import check_outputs
from starflow_jax.config import model_config
from starflow_jax.evaluate import quality
from starflow_jax.sampling import block_policies
from starflow_jax.sampling.pipeline import TrainingNoise, batch_split, replicate
from starflow_jax.sampling.visualize import to_uint8

EVAL_RESULT = "eval.json"  # default --out in the workdir


def add_parser(sub):
    p = sub.add_parser(
        "eval", help="sample N images (or moving-digits clips) and score them (digits FD + accuracy, or FID + IS)"
    )
    model_source.add_arguments(p, allow_random=True, required=False)  # not with --stats-from
    p.add_argument("--out", help=f"the JSON result (default: WORKDIR/{EVAL_RESULT}; required without --workdir)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--num", type=int, default=1000, help="number of samples")
    p.add_argument("--batch-size", type=int, default=250, help="samples generated per batch")
    p.add_argument("--seed", type=int, default=0, help="batch i samples with a seed derived from (seed, i)")
    sampling_args.add_arguments(p)
    p.add_argument("--noise-std", type=float, default=None, help="training noise level (default: config.train)")
    p.add_argument("--no-denoise", action="store_true", help="no denoising step (as `sample --no-denoise`)")
    p.add_argument("--quantize", action="store_true", help="round to train.levels (as `sample --quantize`)")
    p.add_argument(
        "--classifier",
        help="digits models: the cached digits classifier (.npz; trained there in seconds when absent; "
        "default: digits_classifier.npz beside --out)",
    )
    p.add_argument(
        "--inception-weights",
        help="other models: the FID Inception-v3 weights, pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
        "or torch-fidelity's weights-inception-2015-12-05-6726825d.pth",
    )
    p.add_argument("--stats", help="with --inception-weights: the reference statistics .npz (mu, sigma) for FID")
    p.add_argument(
        "--prompts",
        help="text-conditioned models: a text file of prompts, one per line, cycled over the samples (needs "
        "--text-encoder)",
    )
    p.add_argument("--text-encoder", help="with --prompts: the T5 checkpoint directory the model was trained with")
    p.add_argument(
        "--vae",
        help="latent models: the diffusers autoencoder directory that decodes the samples to pixels before scoring",
    )
    p.add_argument(
        "--clip",
        help="with --prompts: a transformers CLIP checkpoint directory (e.g. openai/clip-vit-large-patch14) for "
        "the CLIP score of each sample against its prompt",
    )
    p.add_argument(
        "--save-npy",
        help="also save the samples (n, c, h, w; clips n, t, c, h, w) and their labels: X.npy and X.labels.npy",
    )
    p.add_argument(
        "--grid",
        help="also write a PNG grid of the first samples (up to 100; clips: one row of frames each, up to 20)",
    )
    p.add_argument("--grid-scale", type=int, default=4, help="--grid: pixel upscaling")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits")
    p.add_argument(
        "--stats-from",
        metavar="DIR",
        help="instead of sampling: write the FID reference statistics (--out, an .npz with mu and sigma) of the "
        "images under DIR (any depth) with --inception-weights, each read at --image-size",
    )
    p.add_argument("--image-size", type=int, help="--stats-from: the side images are resized and cropped to")
    processes.add_arguments(p)
    p.set_defaults(func=run)
    return p


def _check(args) -> pathlib.Path:
    if args.num < 2:
        raise ValueError(f"--num must be >= 2 (a covariance), got {args.num}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampling_args.check(args)
    if args.stats and not args.inception_weights:
        raise ValueError("--stats needs --inception-weights (the FID Inception-v3)")
    if args.clip and not args.prompts:
        raise ValueError("--clip scores samples against their prompts: it needs --prompts")
    if args.prompts and not args.text_encoder:
        raise ValueError("--prompts need --text-encoder (the T5 checkpoint directory the model was trained with)")
    if args.out:
        return pathlib.Path(args.out)
    if not args.workdir:
        raise ValueError("--out is required unless --workdir is given")
    if "://" in str(args.workdir):
        raise ValueError("a workdir on object storage needs --out (a local file)")
    return pathlib.Path(args.workdir) / EVAL_RESULT


def _run_batches(args, config, model, opts, conditioning, decode, store, keep, split) -> None:
    """Sample this process's share of the batches (batch ``i`` on process ``i mod count``)
    that ``store`` does not hold yet, and save for each what ``keep(i, samples)`` keeps."""
    import jax

    batches = math.ceil(args.num / args.batch_size)
    mine = range(jax.process_index(), batches, jax.process_count())
    kept = [i for i in mine if store.done(i)]
    if kept:
        print(f"{len(kept)} of {len(mine)} batches already done in {store.directory}: continuing", file=sys.stderr)
    quality.sample_batches(
        model,
        config,
        [i for i in mine if not store.done(i)],
        num=args.num,
        batch_size=args.batch_size,
        seed=args.seed,
        opts=opts,
        conditioning=conditioning,
        temperature=args.temperature,
        noise=TrainingNoise.from_config(config, std=args.noise_std),
        denoise=not args.no_denoise,
        quantize=args.quantize,
        decode=decode,
        batch_sharding=split,
        save=lambda i, samples: store.save(i, keep(i, samples)),
        log=lambda m: print(m, file=sys.stderr),
    )


def _digits(args, config, samples, labels, out_path: pathlib.Path) -> dict:
    from starflow_jax.evaluate import digits_classifier as dc

    path = pathlib.Path(args.classifier) if args.classifier else out_path.parent / dc.CACHE_NAME
    return quality.digits_quality(
        config, samples, labels, path, log=lambda m: print(m, file=sys.stderr), rounded=bool(args.quantize)
    )


def _read_prompts(path: str) -> list[str]:
    """The prompts of ``--prompts``: one per non-empty line."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts {p} does not exist")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {p} holds no prompt (one per line)")
    return prompts


def _prompt_conditioning(text_encoder: str, cfg, prompts: list[str]):
    """Sample ``i``'s conditioning: prompt ``i mod len(prompts)`` through the T5 encoder (the
    empty prompt's embedding as the null condition for guidance), batch by batch."""
    from starflow_jax.sampling.pipeline import Conditioning
    from starflow_jax.text import convert_t5
    from starflow_jax.text import prompts as P

    encoder = convert_t5.t5_from_transformers(text_encoder)
    if encoder.config.d_model != cfg.txt_dim:
        raise ValueError(
            f"the text encoder in {text_encoder} gives {encoder.config.d_model}-dim embeddings, "
            f"the model reads txt_dim={cfg.txt_dim}"
        )
    tokenizer = P.load_tokenizer(text_encoder)

    def cond(start: int, n: int):
        texts = [prompts[(start + j) % len(prompts)] for j in range(n)]
        y = P.encode_prompts(encoder, tokenizer, texts, cfg.txt_size)
        y_null = P.null_embedding(encoder, tokenizer, cfg.txt_size, batch_size=n)
        return Conditioning(np.asarray(y, np.float32), np.asarray(y_null, np.float32))

    return cond


def _write_grid(path: pathlib.Path, samples: np.ndarray, scale: int) -> None:
    """The first samples as a PNG: 100 images in rows of 10, or 20 clips, a row of frames each."""
    from starflow_jax.sampling.visualize import grid, save_png

    if samples.ndim == 5:
        clips = samples[:20]
        images, nrow = clips.reshape(-1, *clips.shape[2:]), clips.shape[1]
    else:
        images, nrow = samples[:100], 10
    save_png(path, grid(to_uint8(images, pixel_space=True), nrow=nrow), scale=scale)
    print(f"wrote {path}")


def _settings(args, labels, prompts=None, jacobi_blocks: str = "") -> dict:
    """What the samples and their scores depend on: the result's header, and what a run
    continued from kept batches must share with the one that made them."""
    return {
        "source": args.workdir or args.weights or "random-init",
        "step": args.step,
        "ema": bool(args.ema),
        "num_samples": int(args.num),
        "batch_size": int(args.batch_size),
        "seed": int(args.seed),
        "options": {
            "cfg": args.cfg,
            "attn_temp": args.attn_temp,
            "temperature": args.temperature,
            "jacobi": bool(args.jacobi),
            "jacobi_block_size": args.jacobi_block_size,
            "jacobi_th": args.jacobi_th,
            "jacobi_max_iter": args.jacobi_max_iter,
            "jacobi_policy": args.jacobi_policy,
            "jacobi_init": args.jacobi_init,
            "jacobi_blocks": jacobi_blocks,
            "noise_std": args.noise_std,
            "denoise": not args.no_denoise,
            "quantize": bool(args.quantize),
            "labels": "spread over classes" if labels is not None else None,
            "prompts": prompts,
        },
        "overrides": list(args.overrides),
        "inception_weights": args.inception_weights,
        "vae": args.vae,
        "text_encoder": args.text_encoder,
        "clip": args.clip,
        "kept": "samples" if args.save_npy or args.grid or not args.inception_weights else "features",
    }


def write_statistics(args) -> int:
    """``eval --stats-from DIR``: the reference statistics of real images, for ``--stats``."""
    from starflow_jax.evaluate.frechet import save_statistics
    from starflow_jax.evaluate.inception import load_fid_inception
    from starflow_jax.evaluate.reference_stats import folder_statistics

    if not args.inception_weights:
        raise ValueError("--stats-from needs --inception-weights (the FID Inception-v3 weight file)")
    if not args.image_size:
        raise ValueError("--stats-from needs --image-size (the side of the model's samples, in pixels)")
    if not args.out or pathlib.Path(args.out).suffix != ".npz":
        raise ValueError(f"--stats-from writes pytorch-fid's .npz: give --out FILE.npz (got {args.out!r})")
    out = pathlib.Path(args.out)
    check_outputs([out], args.overwrite)
    model = load_fid_inception(args.inception_weights)
    mu, sigma, count = folder_statistics(
        model, args.stats_from, args.image_size, log=lambda m: print(m, file=sys.stderr)
    )
    save_statistics(out, mu, sigma)
    print(f"wrote {out}: the statistics of {count} images under {args.stats_from} at {args.image_size}px")
    return 0


def run(args) -> int:
    import jax

    from starflow_jax.evaluate.batch_store import BatchStore, parts_dir

    if args.stats_from:
        return write_statistics(args)
    if not (args.weights or args.workdir or args.random_init):
        raise ValueError("one of --weights, --workdir or --random-init is required (the model to sample)")
    processes.initialize(args)
    lead = jax.process_index() == 0
    out_path = _check(args)
    npy = pathlib.Path(args.save_npy) if args.save_npy else None
    labels_npy = npy.with_suffix(".labels.npy") if npy is not None else None
    grid_path = pathlib.Path(args.grid) if args.grid else None
    if grid_path is not None and grid_path.suffix.lower() != ".png":
        raise ValueError(f"--grid writes a .png, got {grid_path}")
    check_outputs([out_path, npy, labels_npy, grid_path], args.overwrite)
    config = model_source.read_config(args)
    cfg = model_config(config)
    digits = quality.is_digits(config, cfg)
    if model_source.is_video_model(config, cfg) and not (digits and quality.clip_frames(config) >= 2):
        raise ValueError("eval scores image models and moving-digits clips; this is another video model")
    if not digits and not (args.inception_weights or args.clip):
        raise ValueError(
            "this is not a model of the embedded digits: scoring it needs --inception-weights "
            "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth) and, for FID, --stats; or, with --prompts, --clip"
        )
    if not digits and cfg.in_channels not in (1, 3) and not args.vae:
        raise ValueError(
            f"FID/IS need pixels; this model has {cfg.in_channels} (latent) channels: give --vae (its autoencoder)"
        )
    prompts = _read_prompts(args.prompts) if args.prompts else None
    if prompts is None:
        labels = quality.class_labels(cfg, args.num)
    elif cfg.txt_size <= 1:
        raise ValueError(f"--prompts: this model is not text-conditioned (txt_size={cfg.txt_size})")
    inception = stats = vae = clip_model = clip_ids = None
    # everything is read before any sampling: a missing file fails at once
    if args.inception_weights:
        from starflow_jax.evaluate.frechet import load_statistics
        from starflow_jax.evaluate.inception import load_fid_inception

        stats = load_statistics(args.stats) if args.stats else None
        inception = load_fid_inception(args.inception_weights)
    if args.vae:
        from starflow_jax.autoencoders.loading import load_autoencoder

        vae = load_autoencoder(args.vae)
        if vae.latent_channels != cfg.in_channels:
            raise ValueError(
                f"the VAE in {args.vae} has {vae.latent_channels} latent channels, the model models {cfg.in_channels}"
            )
    if prompts is not None:
        conditioning = _prompt_conditioning(args.text_encoder, cfg, prompts)
        labels = None
    else:
        conditioning = quality.label_conditioning(cfg, labels)
    if args.clip:
        from starflow_jax.evaluate import clip

        clip_model = clip.load_clip(args.clip)
        clip_ids = clip.tokenize(args.clip, prompts)  # (len(prompts), length): sample i's are row i mod len
    opts = sampling_args.options(args, config)
    settings = _settings(args, labels, prompts, block_policies.text(opts.jacobi_blocks))
    # process 0 sets the store up (or starts it over); the others wait for it
    store = BatchStore(parts_dir(out_path), settings, restart=args.overwrite) if lead else None
    processes.barrier("eval-store")
    store = store or BatchStore(parts_dir(out_path), settings)

    def keep(i, samples):
        out = {"samples": samples} if settings["kept"] == "samples" else {}
        pixels = None if digits else to_uint8(samples, pixel_space=True)
        if inception is not None:
            from starflow_jax.evaluate.scores import inception_features

            out["pool"], out["logits"] = inception_features(inception, pixels)
        if clip_model is not None:
            out["clip"] = quality.clip_cosines(clip_model, pixels, clip_ids, i * args.batch_size)
        return out

    config, model = model_source.load_model(args, seed=args.seed)
    split = batch_split()  # each batch over this process's devices, the model on each
    replicate(model, split)
    if split.mesh.size > 1:
        print(f"each batch split over {split.mesh.size} devices (when it divides evenly)", file=sys.stderr)
    _run_batches(args, config, model, opts, conditioning, vae.decode if vae is not None else None, store, keep, split)
    processes.barrier("eval-batches")
    if not lead:
        print(f"process {jax.process_index()}: its batches are in {store.directory}; process 0 scores them")
        return 0
    kept = store.gather(math.ceil(args.num / args.batch_size))
    if npy is not None:
        np.save(npy, kept["samples"])
        if labels is not None:
            np.save(labels_npy, labels)
    if args.grid:
        _write_grid(pathlib.Path(args.grid), kept["samples"], args.grid_scale)
    metrics = _digits(args, config, kept["samples"], labels, out_path) if digits else {}
    if inception is not None:
        from starflow_jax.evaluate.scores import inception_scores

        metrics.update(inception_scores(kept["pool"], kept["logits"], stats, splits=args.is_splits))
    if clip_model is not None:  # torchmetrics: the mean over every pair, then clamped at 0
        metrics["clip_score_mean"] = float(np.mean(kept["clip"]))
        metrics["clip_score"] = max(metrics["clip_score_mean"], 0.0)
    result = {k: v for k, v in settings.items() if k not in ("batch_size", "kept", "inception_weights")}
    result["metrics"] = metrics
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    store.remove()
    print(format_table(metrics))
    print(f"wrote {out_path}")
    return 0


_NAMES = {
    "digits_fd": "digits FD (vs train split)",
    "digits_fd_heldout": "digits FD floor (held-out vs train)",
    "accuracy": "class accuracy (digits classifier)",
    "accuracy_real": "class accuracy of real held-out frames",
    "motion_score": "motion score (0: one constant roll)",
    "motion_score_real": "motion score of real clips",
    "motion_score_real_dequantised": "motion score of real clips, dequantised",
    "motion_score_shuffled": "motion score, frames shuffled",
    "fid": "FID",
    "inception_score": "Inception Score",
    "inception_score_std": "Inception Score std",
    "clip_score": "CLIP score",
    "clip_score_mean": "CLIP score before the clamp at 0",
}


def format_table(metrics: dict) -> str:
    """The numeric metrics, one per line, named for people."""
    rows = [(_NAMES.get(k, k), v) for k, v in metrics.items() if isinstance(v, (int, float))]
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {value:.4f}" for name, value in rows)
