"""``starflow-jax bench vae``: throughput and memory of the Flax Wan video VAE, side by side
with diffusers' ``AutoencoderKLWan`` (same random weights) when diffusers and torch are
installed.

The model has the Wan2.2 structure (residual blocks, 2x2 patchify, z_dim 48, temporal
downsampling in the last two stages) at a chosen width (``--base-dim``; the released model
has 160, decoder 256), built in diffusers and converted, or built in Flax with constant
weights without diffusers. Rows: ``{impl: "jax-chunked" | "jax-whole" | "diffusers", op,
frames, size, seconds, frames_per_s}`` (median of ``--repeats`` after compilation), and the
compiled temporary memory of the decoding programs: one latent frame at a time (first chunk,
later chunks, the carried cache: flat in the frame count) against one pass over ``T``
latent frames."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.bench.common import print_table, timed, write_json

COLUMNS = [
    ("impl", "impl", "s"),
    ("op", "op", "s"),
    ("frames", "frames", "d"),
    ("size", "size", "d"),
    ("seconds", "seconds", ".3f"),
    ("frames_per_s", "frames/s", ".1f"),
]
MIB = 2**20


def add_parser(sub):
    p = sub.add_parser("vae", help="Wan video VAE: encode / decode throughput and decoding memory")
    p.add_argument("--frames", default="5,17", help="video frames (1 + 4k), comma separated")
    p.add_argument("--size", type=int, default=64, help="video side in pixels (a multiple of 16)")
    p.add_argument("--base-dim", type=int, default=32, help="encoder width (decoder: 1.5x)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-frames", default="2,4,8,16", help="latent frame counts of the memory table")
    p.add_argument("--no-reference", action="store_true", help="skip diffusers even when installed")
    p.add_argument("--json", help="write the rows here")
    p.set_defaults(func=run)
    return p


def wan22_config(base_dim: int) -> dict:
    return dict(
        base_dim=base_dim,
        decoder_base_dim=base_dim * 3 // 2,
        z_dim=48,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
    )


def _models(cfg: dict, reference: bool):
    from starflow_jax.autoencoders import AutoencoderKLWan, WanVAEConfig, wan_from_diffusers

    if reference:
        try:
            import diffusers
            import torch
        except ImportError:
            reference = False
    if reference:
        torch.manual_seed(0)
        ref = diffusers.AutoencoderKLWan(**cfg).eval()
        return wan_from_diffusers(ref), ref
    abstract = nnx.eval_shape(lambda: AutoencoderKLWan(WanVAEConfig.from_diffusers_config(cfg), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, s.dtype), state)
    return nnx.merge(graphdef, state), None


def decode_memory(vae, side: int, counts: list[int]) -> dict:
    """Compiled temporary memory (MiB) of the decoding programs, from abstract shapes."""
    from starflow_jax.autoencoders.wan_vae import decode_program

    graphdef, state = nnx.split(vae)
    ls, z = side // vae.cfg.spatial_compression, vae.cfg.z_dim

    def temp(zs, cache):
        return decode_program.lower(graphdef, state, zs, cache).compile().memory_analysis().temp_size_in_bytes / MIB

    one = jax.ShapeDtypeStruct((1, 1, ls, ls, z), jnp.float32)
    cache = jax.eval_shape(lambda st, zz: decode_program(graphdef, st, zz, None)[1], state, one)
    return dict(
        first_chunk_mib=temp(one, None),
        next_chunk_mib=temp(one, cache),
        cache_mib=sum(int(np.prod(c.shape)) * c.dtype.itemsize for c in jax.tree.leaves(cache)) / MIB,
        whole_mib={int(t): temp(jax.ShapeDtypeStruct((1, t, ls, ls, z), jnp.float32), None) for t in counts},
    )


def run(args) -> int:
    from starflow_jax.autoencoders.wan_vae import decode_pixels, encode_moments

    frames = [int(f) for f in args.frames.split(",") if f.strip()]
    if any((f - 1) % 4 for f in frames) or args.size % 16:
        raise ValueError(f"--frames must be 1 + 4k and --size a multiple of 16, got {frames} and {args.size}")
    cfg = wan22_config(args.base_dim)
    vae, ref = _models(cfg, not args.no_reference)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(vae, nnx.Param)))
    print(
        f"Wan2.2-structured VAE, base_dim {args.base_dim}: {n_params / 1e6:.1f} M parameters; {args.size}x"
        f"{args.size} video; device {jax.devices()[0].device_kind}; "
        + ("diffusers side by side" if ref is not None else "no diffusers row")
    )
    rng = np.random.default_rng(0)
    rows = []
    f = vae.cfg.spatial_compression
    for t in frames:
        x = rng.uniform(-1, 1, (1, t, args.size, args.size, 3)).astype(np.float32)
        lat = 1 + (t - 1) // 4
        z = rng.normal(size=(1, lat, args.size // f, args.size // f, vae.cfg.z_dim)).astype(np.float32)
        for chunked in (True, False):
            impl = "jax-chunked" if chunked else "jax-whole"
            for op, fn in (
                ("encode", lambda: encode_moments(vae, jnp.asarray(x), chunked)),
                ("decode", lambda: decode_pixels(vae, jnp.asarray(z), chunked)),
            ):
                s = timed(fn, args.repeats)[1]
                rows.append(dict(impl=impl, op=op, frames=t, size=args.size, seconds=s, frames_per_s=t / s))
        if ref is not None:
            import torch

            xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
            zt = torch.from_numpy(np.ascontiguousarray(z.transpose(0, 4, 1, 2, 3)))
            with torch.no_grad():
                for op, fn in (("encode", lambda: ref.encode(xt)), ("decode", lambda: ref.decode(zt))):
                    s = timed(fn, args.repeats)[1]
                    rows.append(dict(impl="diffusers", op=op, frames=t, size=args.size, seconds=s, frames_per_s=t / s))
    print_table(rows, COLUMNS)
    counts = [int(c) for c in args.memory_frames.split(",") if c.strip()]
    mem = decode_memory(vae, args.size, counts)
    print(
        f"decoding memory (compiled temporaries): one latent frame at a time: first chunk "
        f"{mem['first_chunk_mib']:.1f} MiB, later chunks {mem['next_chunk_mib']:.1f} MiB, carried cache "
        f"{mem['cache_mib']:.2f} MiB, whatever the frame count; one pass: "
        + ", ".join(f"T={t}: {m:.1f} MiB" for t, m in mem["whole_mib"].items())
    )
    write_json(args.json, dict(rows=rows, decode_memory=mem, parameters=n_params, base_dim=args.base_dim))
    return 0
