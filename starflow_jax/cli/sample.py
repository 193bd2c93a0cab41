"""``starflow-jax sample``: draw samples and write them as a picture (PNG grid, or GIF for video)."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax.numpy as jnp
import numpy as np

from starflow_jax.cli import model_source, sampling_args
from starflow_jax.cli.output_paths import check_outputs
from starflow_jax.config import model_config
from starflow_jax.sampling.pipeline import Conditioning, TrainingNoise, batch_split, encode_given, generate, replicate
from starflow_jax.sampling.shapes import ASPECT_RATIOS, size_for_aspect_ratio
from starflow_jax.sampling.visualize import grid, save_gif, save_mp4, save_png, to_uint8


def add_parser(sub):
    p = sub.add_parser("sample", help="sample from a model and write a PNG grid (GIF or MP4 for video)")
    model_source.add_arguments(p, allow_random=True)
    p.add_argument(
        "--out",
        required=True,
        help="output picture: .png (grid; video frames side by side), .gif or .mp4 (video frames)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --save-npy) if it exists")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of a .gif / .mp4")
    p.add_argument("--num", type=int, default=16, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", help="class labels, comma separated (cycled over --num); null class = the last index")
    p.add_argument("--cond", help=".npy of conditioning embeddings (num, txt_size, txt_dim)")
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="a text prompt (repeatable; cycled over --num); needs --text-encoder",
    )
    p.add_argument("--prompts", help="a text file of prompts, one per line")
    p.add_argument(
        "--text-encoder",
        help="a transformers T5 checkpoint directory with its tokenizer files "
        "(e.g. google/flan-t5-xl downloaded beforehand)",
    )
    p.add_argument(
        "--vae",
        help="a diffusers autoencoder directory, samples are decoded to pixels: an "
        "AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema; videos frame by frame) or an "
        "AutoencoderKLWan (video latents: t latent frames -> 1 + 4 (t - 1) frames), "
        "optionally DIR:SCALE, the temporal latent scale (Wan2.2-TI2V-5B: 0.6)",
    )
    p.add_argument(
        "--aspect-ratio",
        choices=ASPECT_RATIOS,
        default=None,
        help="sample shape (and, with prompts, the reference's aspect-ratio prompt template)",
    )
    p.add_argument("--fps-cond", action="store_true", help="prompts carry --fps as the reference's fps template")
    p.add_argument(
        "--noise-level-cond",
        action="store_true",
        help="prompts carry the noise level (the reference's cond_noise_level template)",
    )
    p.add_argument("--cond-null", help=".npy of the null conditioning (txt_size, txt_dim); default zeros")
    sampling_args.add_arguments(p)
    p.add_argument(
        "--unroll-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="unroll the layers inside the token loop (default: on the CPU only)",
    )
    p.add_argument(
        "--cache-segments",
        type=int,
        default=2,
        help="sequential sampling with unrolled layers: token-loop segments, each reading only "
        "the KV cache written so far",
    )
    p.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="frames of a video sample (video models; default: config.data.num_frames): the model's "
        "(latent) frames, also the attention window when --target-length is longer",
    )
    p.add_argument(
        "--target-length",
        type=int,
        default=None,
        help="video models: sample this many frames, beyond --num-frames: the deep block's attention "
        "window (--num-frames, or the model's local_attn_window) slides, re-encoding the last "
        "--context-frames frames",
    )
    p.add_argument(
        "--context-frames",
        type=int,
        default=None,
        help="frames re-encoded when the attention window slides (default: window - 1)",
    )
    p.add_argument("--input-image", help="image-to-video: an image file kept as the first frame of every sample")
    p.add_argument(
        "--input-video", help="video-to-video: a video file whose first --input-frames frames are kept and continued"
    )
    p.add_argument(
        "--input-frames",
        type=int,
        default=None,
        help="frames taken from --input-video (default: all, up to the sampled frames - 1)",
    )
    p.add_argument(
        "--noise-std",
        type=float,
        default=None,
        help="training noise level for the denoising step (default: config.train.noise_std, else none)",
    )
    p.add_argument(
        "--no-denoise",
        action="store_true",
        help="keep the training noise in the samples: no denoising step (models trained with train.noise_std > 0)",
    )
    p.add_argument(
        "--quantize",
        action="store_true",
        help="round samples of uniformly dequantised data (train.noise_type='uniform') back to the "
        "data's train.levels, as the training previews do",
    )
    p.add_argument(
        "--pixel-space",
        action="store_true",
        help="show samples as [-1, 1] pixels (default: when in_channels is 1 or 3)",
    )
    p.add_argument("--scale", type=int, default=1, help="integer upscaling of the written picture")
    p.add_argument("--save-npy", help="also save the raw samples to this .npy")
    p.add_argument(
        "--motion-score",
        action="store_true",
        help="video: print how far the clips are from moving digits (data.moving_digits.motion_score: "
        "0 for a frame rolled by one constant velocity), next to the real held-out clips' for a moving-digits workdir",
    )
    p.set_defaults(func=run)
    return p


def _progress(i: int, n: int, t0: float):
    bar = "#" * i + "." * (n - i)
    print(
        f"\rsampling blocks [{bar}] {i}/{n} {time.time() - t0:6.1f}s",
        end="" if i < n else "\n",
        file=sys.stderr,
        flush=True,
    )


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = pathlib.Path(args.prompts)
        if not path.exists():
            raise ValueError(f"--prompts {path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def _noise_std(args, config) -> float | None:
    if args.noise_std is not None:
        return args.noise_std
    if "train" in config and "noise_std" in config.train:
        return float(config.train.noise_std)
    return None


def _text_conditioning(args, config, cfg, num: int, prompts: list[str]):
    """Prompts through the T5 encoder (the reference's templates; the null prompt "" for
    guidance)."""
    if not args.text_encoder:
        raise ValueError("--prompt / --prompts need --text-encoder (a T5 checkpoint directory)")
    from starflow_jax.text import convert_t5
    from starflow_jax.text import prompts as P

    encoder = convert_t5.t5_from_transformers(args.text_encoder)
    if encoder.config.d_model != cfg.txt_dim:
        raise ValueError(
            f"the text encoder in {args.text_encoder} gives {encoder.config.d_model}-dim embeddings, "
            f"the model reads txt_dim={cfg.txt_dim}"
        )
    tokenizer = P.load_tokenizer(args.text_encoder)
    kw = dict(
        aspect_ratio=args.aspect_ratio,
        fps=args.fps if args.fps_cond else None,
        noise_std=_noise_std(args, config) if args.noise_level_cond else None,
    )
    texts = [prompts[i % len(prompts)] for i in range(num)]
    y = np.asarray(P.encode_prompts(encoder, tokenizer, texts, cfg.txt_size, **kw), np.float32)
    y_null = np.asarray(P.null_embedding(encoder, tokenizer, cfg.txt_size, batch_size=num, **kw), np.float32)
    return y, y_null


def _conditioning(args, config, cfg, num: int):
    prompts = _prompts(args)
    if cfg.txt_dim == 0:
        if args.labels or args.cond or prompts or args.cfg > 0:
            raise ValueError(
                "the model is unconditional (txt_dim=0): --labels, --cond, --prompt and --cfg do not apply"
            )
        return None
    if sum(map(bool, (args.labels, args.cond, prompts))) != 1:
        raise ValueError(
            f"the model is conditioned (txt_size={cfg.txt_size}, txt_dim={cfg.txt_dim}): "
            "give exactly one of --labels, --cond or --prompt/--prompts"
        )
    if prompts:
        y, y_null = _text_conditioning(args, config, cfg, num, prompts)
    elif args.labels:
        if cfg.txt_size != 1:
            raise ValueError(
                f"--labels needs a label-conditioned model (txt_size=1), this one has txt_size={cfg.txt_size}"
            )
        try:
            labels = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError as e:
            raise ValueError(f"--labels must be comma-separated integers, got {args.labels!r}") from e
        if not labels or min(labels) < 0 or max(labels) >= cfg.txt_dim - 1:
            raise ValueError(f"labels must lie in [0, {cfg.txt_dim - 1}) (index {cfg.txt_dim - 1} is the null class)")
        from starflow_jax.flow.labels import one_hot_labels

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


def _given_frames(args, cfg, vae, frames: int, pixel_hw: tuple[int, int]):
    """The first frames to keep (``--input-image`` / ``--input-video``), read and fitted to
    the sample size, in the model's space (``encode_given``): ``(g, c, h, w)`` or ``None``."""
    if not (args.input_image or args.input_video):
        return None
    if args.input_image and args.input_video:
        raise ValueError("give one of --input-image and --input-video")
    if frames == 0:
        raise ValueError("--input-image / --input-video need a video model (--num-frames)")
    path = pathlib.Path(args.input_image or args.input_video)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    channels = vae.pixel_channels if vae is not None else cfg.in_channels
    if channels not in (1, 3):
        raise ValueError(f"the model has {cfg.in_channels} channels and no --vae: it cannot read pictures")
    if args.input_image:
        from PIL import Image

        try:
            with Image.open(path) as im:
                pics = [np.asarray(im.convert("RGB"))]
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    else:
        from starflow_jax.sampling.visualize import read_video_frames

        try:
            pics = list(read_video_frames(path))
        except Exception as e:
            raise ValueError(f"cannot read video {path}: {type(e).__name__}: {e}") from e
        if not pics:
            raise ValueError(f"{path} holds no frames")
        # counted in the model's (latent) frames; a video VAE reads 1 + 4 (g - 1) pixel frames for g
        per = (lambda g: vae.pixel_frames(g)) if vae is not None else (lambda g: g)  # noqa: E731
        avail = max(g for g in range(1, frames + 1) if g == 1 or per(g) <= len(pics))
        g = args.input_frames if args.input_frames is not None else min(avail, frames - 1) or 1
        if not 1 <= g <= avail:
            raise ValueError(
                f"--input-frames must lie in [1, {avail}] ({path} has {len(pics)} frames, {frames} "
                f"are sampled), got {g}"
            )
        pics = pics[: per(g)]
    from starflow_jax.data.video import resize_crop

    x = np.stack([resize_crop(p, *pixel_hw, channels) for p in pics])  # (g, c, H, W) pixels
    return encode_given(x, vae)


def _frames_progress(done: int, total: int, t0: float):
    width = min(total, 40)
    filled = round(width * done / total)
    print(
        f"\rsampling frames [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {time.time() - t0:6.1f}s",
        end="" if done < total else "\n",
        file=sys.stderr,
        flush=True,
    )


def _video_frames(args, config, cfg) -> tuple[int, int | None]:
    """``(frames to sample, SamplingOptions.window_frames)`` from --num-frames /
    --target-length (0 frames: an image model, which takes neither). Beyond --num-frames the
    attention window is the model's ``local_attn_window``, else --num-frames (the training
    length); whether it slides is decided by ``sampler.attention_window``."""
    num = args.num_frames
    video = model_source.is_video_model(config, cfg)
    if not video and (num is not None or args.target_length is not None):
        flag = "--num-frames" if num is not None else "--target-length"
        raise ValueError(
            f"{flag} needs a video model; this model samples images (no temporal setup: "
            f"temporal_causal={cfg.temporal_causal}, no data.num_frames)"
        )
    if num is None and video and "data" in config and config.data.get("num_frames"):
        num = int(config.data.num_frames)
    if args.target_length is not None:
        if num is None:
            raise ValueError("--target-length needs --num-frames (the training length: the attention window)")
        if args.target_length < 1:
            raise ValueError(f"--target-length must be >= 1, got {args.target_length}")
        return args.target_length, (None if cfg.local_attn_window else num)
    if num is None:
        if video:
            raise ValueError("a video model needs --num-frames (or config.data.num_frames)")
        return 0, None
    if num < 1:
        raise ValueError(f"--num-frames must be >= 1, got {num}")
    return num, None


def _motion(config, x: np.ndarray, rounded: bool) -> str:
    """The motion score line of ``--motion-score`` (the real clips' and chance's too when the
    workdir trained on moving digits)."""
    from starflow_jax.data import moving_digits as md

    if "data" in config and config.data.get("name") == "moving_digits":
        from starflow_jax.data.sources import make_data

        data = make_data(config)
        real = data.heldout if data.heldout is not None else data.train
        clips = np.stack([real[i]["image"] for i in range(len(real))])
        # real clips of the training length, scored against the run's own velocities
        return md.describe_motion(md.config_motion_report(config, x, clips, rounded))
    return f"motion score {md.motion_score(x):.4f}"


def run(args) -> int:
    out = pathlib.Path(args.out)
    if out.suffix.lower() not in (".png", ".gif", ".mp4"):
        raise ValueError(f"--out must end in .png, .gif or .mp4, got {out.name}")
    if args.fps <= 0:
        raise ValueError(f"--fps must be > 0, got {args.fps}")
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    sampling_args.check(args)
    # the outputs and the sample's frames are checked before the model is loaded
    check_outputs([out, args.save_npy], args.overwrite)
    config = model_source.read_config(args)
    frames, window = _video_frames(args, config, model_config(config))
    if not frames and out.suffix.lower() != ".png":
        raise ValueError(f"image samples are written as a .png grid, not {out.suffix}")
    if args.motion_score and frames < 2:
        raise ValueError("--motion-score needs video samples of 2 frames or more")
    config, model = model_source.load_model(args, seed=args.seed)
    cfg = model.cfg
    cond = _conditioning(args, config, cfg, args.num)
    vae = None
    if args.vae:
        from starflow_jax.autoencoders.loading import load_autoencoder

        vae = load_autoencoder(args.vae)
        if vae.latent_channels != cfg.in_channels:
            raise ValueError(
                f"the VAE in {args.vae} has {vae.latent_channels} latent channels, the model models {cfg.in_channels}"
            )
    factor = vae.spatial if vae is not None else 1
    h, w = size_for_aspect_ratio(cfg.img_size * factor, args.aspect_ratio, factor * cfg.patch_size)
    shape = (args.num, cfg.in_channels, h // factor, w // factor)
    if frames:
        shape = (args.num, frames) + shape[1:]
    given = _given_frames(args, cfg, vae, frames, (h, w))
    opts = sampling_args.options(
        args,
        config,
        unroll_layers=args.unroll_layers,
        cache_segments=args.cache_segments,
        window_frames=window,
        context_frames=args.context_frames,
    )
    split = batch_split()  # the samples over this machine's devices, the model on each (as `eval`)
    if split.mesh.size > 1:
        replicate(model, split)
        how = "split" if args.num % split.mesh.size == 0 else f"not split (--num is no multiple of {split.mesh.size})"
        print(f"samples {how} over {split.mesh.size} devices", file=sys.stderr)
    t0 = time.time()
    out_samples = generate(
        model,
        shape,
        args.seed,
        None if cond is None else Conditioning(*cond),
        opts,
        temperature=args.temperature,
        given=given,
        noise=TrainingNoise.from_config(config, std=args.noise_std),
        denoise_samples=not args.no_denoise,
        quantize_samples=args.quantize,
        decode=vae.decode if vae is not None else None,
        batch_sharding=split,
        on_block=lambda i, n: _progress(i, n, t0),
        on_frame=lambda d, n: _frames_progress(d, n, t0),
    )
    x, passes = out_samples.x, out_samples.passes
    pixel = args.pixel_space or cfg.in_channels in (1, 3) or vae is not None
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
    if args.motion_score:
        print(_motion(config, np.asarray(x), rounded=bool(args.quantize)))
    print(
        f"wrote {out} ({args.num} samples, {'jacobi' if args.jacobi else 'sequential'}, "
        f"network passes per block {passes}, {time.time() - t0:.1f}s)"
    )
    return 0
