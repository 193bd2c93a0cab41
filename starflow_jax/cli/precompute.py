"""``starflow-jax precompute``: images and captions to ArrayRecord shards of VAE latents and
T5 text embeddings for pretraining (``data.name = "array_record"``); resumable."""
from __future__ import annotations

import pathlib


def add_parser(sub):
    p = sub.add_parser("precompute", help="encode images (VAE) and captions (T5) into ArrayRecord training shards")
    p.add_argument("--images", required=True, help="folder of images (paths in --captions are relative to it)")
    p.add_argument("--captions", required=True, help=".tsv (file<TAB>caption per line) or .jsonl ({file, caption})")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL directory")
    p.add_argument("--text-encoder", required=True, help="transformers T5 checkpoint directory with its tokenizer")
    p.add_argument("--out", required=True, help="directory of the shards (rerun with the same settings to resume)")
    p.add_argument("--image-size", type=int, default=256, help="side of the centre crop fed to the VAE")
    p.add_argument("--txt-size", type=int, default=128, help="tokens per caption (the model's txt_size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--records-per-shard", type=int, default=1024)
    p.add_argument("--sample-posterior", action="store_true",
                   help="latents sampled from the VAE posterior (default: its mean)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="discard shards precomputed with other settings")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from starflow_jax.autoencoders.convert_vae import vae_from_diffusers
    from starflow_jax.autoencoders.vae import encode_latents
    from starflow_jax.data.precompute import precompute, read_captions
    from starflow_jax.parallel.mesh import make_mesh
    from starflow_jax.text import convert_t5
    from starflow_jax.text import prompts as P

    pairs = read_captions(args.images, args.captions)
    vae = vae_from_diffusers(args.vae)
    factor = vae.cfg.downsample_factor
    if args.image_size % factor:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of the VAE's factor {factor}")
    encoder = convert_t5.t5_from_transformers(args.text_encoder)
    tokenizer = P.load_tokenizer(args.text_encoder)
    # the batch is spread over every device on a data mesh axis (when it divides)
    mesh = make_mesh({"data": -1})
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

    def encode_texts(captions: list[str]) -> np.ndarray:
        return np.asarray(P.encode_prompts(encoder, tokenizer, captions, args.txt_size))

    settings = dict(vae=str(pathlib.Path(args.vae).resolve()), text_encoder=str(pathlib.Path(args.text_encoder).resolve()),
                    txt_size=args.txt_size, sample_posterior=args.sample_posterior, seed=args.seed,
                    captions=str(pathlib.Path(args.captions).resolve()))
    shards = precompute(pairs, args.out, encode_images=encode_images, encode_texts=encode_texts,
                        image_size=args.image_size, channels=vae.cfg.in_channels, batch_size=args.batch_size,
                        records_per_shard=args.records_per_shard, settings=settings, overwrite=args.overwrite)
    print(f"wrote {len(pairs)} records in {len(shards)} shards to {args.out}: latents "
          f"({vae.cfg.latent_channels}, {args.image_size // factor}, {args.image_size // factor}), text embeddings "
          f"({args.txt_size}, {encoder.config.d_model}); train on them with data.name='array_record', "
          f"data.path={args.out}")
    return 0
