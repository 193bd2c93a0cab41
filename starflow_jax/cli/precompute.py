"""``starflow-jax precompute``: images (or video clips) and captions to ArrayRecord shards of
VAE latents and T5 text embeddings for pretraining (``data.name = "array_record"``); resumable."""

from __future__ import annotations

import pathlib


def add_parser(sub):
    p = sub.add_parser(
        "precompute", help="encode images or videos (VAE) and captions (T5) into ArrayRecord training shards"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (paths in --captions are relative to it)")
    src.add_argument(
        "--videos",
        help="folder of videos (.mp4 .webm .mov .avi .mkv, searched recursively): one clip "
        "each; captions from --captions or a <video name>.txt next to each video",
    )
    p.add_argument(
        "--captions", help=".tsv (file<TAB>caption per line) or .jsonl ({file, caption}); required with --images"
    )
    p.add_argument(
        "--vae",
        required=True,
        help="diffusers autoencoder directory: AutoencoderKL (SD-VAE; videos encoded frame "
        "by frame) or AutoencoderKLWan (videos of 1 + 4k frames to 1 + k "
        "latent frames), optionally DIR:SCALE (Wan temporal latent scale)",
    )
    p.add_argument("--text-encoder", required=True, help="transformers T5 checkpoint directory with its tokenizer")
    p.add_argument("--out", required=True, help="directory of the shards (rerun with the same settings to resume)")
    p.add_argument("--image-size", type=int, default=256, help="side of the centre crop fed to the VAE")
    p.add_argument("--txt-size", type=int, default=128, help="tokens per caption (the model's txt_size)")
    p.add_argument(
        "--aspect-ratio",
        help="an aspect-ratio bucket W:H (1:1 2:3 3:2 16:9 9:16 4:5 5:4 21:9 9:21): "
        "pictures cropped to it at about --image-size squared pixels, captions "
        "with its template; write each bucket to DIR/WxH (data.mix_aspect)",
    )
    p.add_argument(
        "--fps-cond",
        action="store_true",
        help="captions through the fps template: 'A video with {fps} fps:\\n{caption}\\n' "
        "(--images: 'An image:\\n{caption}\\n', for a video model's secondary images)",
    )
    p.add_argument(
        "--noise-level-cond",
        type=float,
        metavar="NOISE_STD",
        help="captions through the noise-level template 'Noise Level {int(1000 NOISE_STD)}:\\n' "
        "(models trained with train.cond_noise_level and train.noise_std=NOISE_STD)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images (videos: frames and captions) per encoder call")
    p.add_argument("--records-per-shard", type=int, default=1024)
    p.add_argument(
        "--sample-posterior", action="store_true", help="latents sampled from the VAE posterior (default: its mean)"
    )
    p.add_argument("--seed", type=int, default=0, help="posterior samples and (videos) the clip chosen in each video")
    p.add_argument("--overwrite", action="store_true", help="discard shards precomputed with other settings")
    p.add_argument(
        "--keep-pixels",
        action="store_true",
        help="also store each image's (clip's) pixels, uint8, in its record: the data of `finetune-decoder` "
        "(finetune.shards=OUT)",
    )
    v = p.add_argument_group("videos")
    v.add_argument("--num-frames", type=int, help="frames per clip (required with --videos)")
    v.add_argument(
        "--fps",
        type=float,
        help="clip frame rate: frames src_fps/fps apart when lower than the video's "
        "(default: each video's own rate, consecutive frames)",
    )
    v.add_argument(
        "--drop-image",
        action="store_true",
        help="also store text_emb_extend, the embedding of '(extend) ' + caption, which training "
        "with train.drop_image > 0 needs",
    )
    p.set_defaults(func=run)
    return p


def _framewise_vae(args, mesh, vae):
    """``encode_images`` of a diffusers-converted AutoencoderKL: ``(b, c, h, w)`` -> latents."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from starflow_jax.autoencoders.vae import encode_latents

    # the batch is spread over every device on a data mesh axis (when it divides)
    shard = NamedSharding(mesh, PartitionSpec("data"))
    encode = nnx.jit(encode_latents)
    key = [jax.random.key(args.seed)]

    def encode_images(x: np.ndarray) -> np.ndarray:
        if x.shape[0] % mesh.size == 0:
            x = jax.device_put(x, shard)
        k = None
        if args.sample_posterior:
            key[0], k = jax.random.split(key[0])
        return np.asarray(encode(vae, x, k))

    return encode_images


def run(args) -> int:
    from starflow_jax.autoencoders.loading import load_autoencoder
    from starflow_jax.parallel.mesh import make_mesh
    from starflow_jax.text import convert_t5
    from starflow_jax.text import prompts as P

    if "://" in args.out:
        raise ValueError(
            f"--out {args.out}: precompute writes local shards; copy them to the bucket afterwards "
            "(training reads data.path=gs://... through a local cache)"
        )
    if args.images is not None and not args.captions:
        raise ValueError("--images needs --captions (a .tsv or .jsonl of file and caption)")
    if args.videos is not None:
        if args.num_frames is None:
            raise ValueError("--videos needs --num-frames (frames per clip)")
    elif args.num_frames is not None or args.fps is not None or args.drop_image:
        raise ValueError("--num-frames, --fps and --drop-image are for --videos")
    if args.images is not None:
        from starflow_jax.data.precompute import read_captions

        pairs = read_captions(args.images, args.captions)
    else:
        from starflow_jax.data.video import VideoFolderSource

        videos = VideoFolderSource(
            args.videos, args.num_frames, args.image_size, fps=args.fps, captions_file=args.captions, seed=args.seed
        )
    ae = load_autoencoder(args.vae)
    vae, factor = ae.model, ae.spatial
    if ae.kind == "video" and args.videos is not None and (args.num_frames - 1) % ae.temporal:
        raise ValueError(
            f"the video VAE in {args.vae} encodes 1 + {ae.temporal}k frames; --num-frames is {args.num_frames}"
        )
    if args.image_size % factor:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of the VAE's factor {factor}")
    encoder = convert_t5.t5_from_transformers(args.text_encoder)
    tokenizer = P.load_tokenizer(args.text_encoder)
    if ae.kind == "image":
        encode_images = _framewise_vae(args, make_mesh({"data": -1}), vae)
    else:  # images through a video VAE: one-frame videos
        if args.sample_posterior:
            raise ValueError("--sample-posterior is for the SD-VAE; the video VAE encodes the posterior mean")
        encode_images = ae.encode

    def encode_texts(captions: list[str]):
        import numpy as np

        return np.asarray(P.encode_prompts(encoder, tokenizer, captions, args.txt_size))

    settings = dict(
        vae=str(pathlib.Path(args.vae).resolve()),
        text_encoder=str(pathlib.Path(args.text_encoder).resolve()),
        txt_size=args.txt_size,
        sample_posterior=args.sample_posterior,
        seed=args.seed,
        captions=str(pathlib.Path(args.captions).resolve()) if args.captions else None,
    )
    size, templates = args.image_size, {}
    if args.aspect_ratio:
        from starflow_jax.data.buckets import bucket_size

        size = bucket_size(args.image_size, args.aspect_ratio, factor)
        templates["aspect_ratio"] = args.aspect_ratio
    if args.noise_level_cond is not None:
        templates["noise_std"] = args.noise_level_cond
    settings.update(templates)
    hw = (size, size) if isinstance(size, int) else size
    if args.videos is not None:
        videos.size = tuple(hw)  # the bucket's frame size, known once the VAE's factor is
    if args.images is not None:
        from starflow_jax.data.precompute import precompute

        shards = precompute(
            pairs,
            args.out,
            encode_images=encode_images,
            encode_texts=encode_texts,
            image_size=size,
            channels=ae.pixel_channels,
            batch_size=args.batch_size,
            records_per_shard=args.records_per_shard,
            settings=settings,
            overwrite=args.overwrite,
            templates=dict(templates, fps=0) if args.fps_cond else templates,
            keep_pixels=args.keep_pixels,
        )
        n, latent = len(pairs), f"({ae.latent_channels}, {hw[0] // factor}, {hw[1] // factor})"
    else:
        from starflow_jax.data.precompute import framewise_video_encoder, precompute_videos, temporal_video_encoder

        if ae.kind == "video":  # the Wan VAE: causal in time, 1 + 4k frames -> 1 + k latent frames
            encode_video = temporal_video_encoder(ae.encode)
        else:
            encode_video = framewise_video_encoder(encode_images, args.batch_size)
        settings.update(
            videos=str(pathlib.Path(args.videos).resolve()),
            num_frames=args.num_frames,
            fps=args.fps,
            image_size=args.image_size,
            encoder="temporal" if ae.kind == "video" else "framewise",
        )
        shards = precompute_videos(
            videos,
            args.out,
            encode_video=encode_video,
            encode_texts=encode_texts,
            fps_cond=args.fps_cond,
            extend=args.drop_image,
            batch_size=args.batch_size,
            records_per_shard=args.records_per_shard,
            templates=templates,
            settings=settings,
            overwrite=args.overwrite,
            keep_pixels=args.keep_pixels,
        )
        t = 1 + (args.num_frames - 1) // ae.temporal if ae.kind == "video" else args.num_frames
        n, latent = len(videos), f"({t}, {ae.latent_channels}, {hw[0] // factor}, {hw[1] // factor})"
    print(
        f"wrote {n} records in {len(shards)} shards to {args.out}: latents {latent}, text embeddings "
        f"({args.txt_size}, {encoder.config.d_model}){' and text_emb_extend' if args.drop_image else ''}"
        f"{' and the pixels (finetune-decoder: finetune.shards=' + args.out + ')' if args.keep_pixels else ''}; "
        f"train on them with data.name='array_record', data.path={args.out}"
    )
    return 0
