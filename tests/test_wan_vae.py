"""The Wan video autoencoder against diffusers' ``AutoencoderKLWan`` on tiny random models of
both forms (Wan2.1: plain blocks; Wan2.2: residual blocks, 2x2 patchify, a wider decoder):
posterior and decoded video within 1e-4 relative in float32, on a video and on images,
whole and chunk by chunk; the latent normalisation and temporal scale; conversion from a
``save_pretrained`` directory; clear errors for bad checkpoints, configs and inputs.

Nothing is downloaded: the diffusers models are built from a config with random weights.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from starflow_jax.autoencoders import (
    AutoencoderKLWan,
    WanVAEConfig,
    WanVAEConfigError,  # noqa: E402
    decode_video,
    encode_video,
    split_vae_name,
    wan_from_diffusers,
)
from starflow_jax.autoencoders.wan_vae import apply_temporal_scale, encode_moments, split_moments  # noqa: E402
from starflow_jax.interop.named_tensors import StateDictMismatch  # noqa: E402

RTOL = 1e-4
_rng = np.random.default_rng(3)
FORMS = {
    "wan2.1": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        scale_factor_spatial=8,
        latents_mean=_rng.normal(0, 0.5, 4).round(4).tolist(),
        latents_std=_rng.uniform(0.5, 2.5, 4).round(4).tolist(),
    ),
    "wan2.2": dict(
        base_dim=8,
        decoder_base_dim=12,
        z_dim=8,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        latents_mean=_rng.normal(0, 0.5, 8).round(4).tolist(),
        latents_std=_rng.uniform(0.5, 2.5, 8).round(4).tolist(),
    ),
}
B, T, S = 2, 9, 32  # videos (B, T, 3, S, S): 1 + 4k frames, 3 latent frames


def _randomize(model) -> None:
    """RMS-norm gammas away from 1 so that a wrong norm layout shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module", params=sorted(FORMS))
def pair(request):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(**FORMS[request.param]).eval()
    _randomize(model)
    return model, wan_from_diffusers(model)


@pytest.fixture(scope="module")
def video():
    return np.random.default_rng(0).uniform(-1, 1, (B, T, 3, S, S)).astype(np.float32)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def to_torch(x):  # (b, t, c, h, w) -> diffusers' (b, c, t, h, w)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).swapaxes(1, 2)))


def from_torch(x):
    return np.asarray(x.numpy()).swapaxes(1, 2)


def _stats(cfg):
    shape = (1, 1, cfg.z_dim, 1, 1)
    return (
        np.reshape(cfg.latents_mean, shape).astype(np.float32),
        np.reshape(cfg.latents_std, shape).astype(np.float32),
    )


def test_video_matches_diffusers(pair, video):
    model, vae = pair
    with torch.no_grad():
        post = model.encode(to_torch(video)).latent_dist
        z = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(2))
        dec = model.decode(z).sample
    want_mean, want_logvar, want_dec = from_torch(post.mean), from_torch(post.logvar), from_torch(dec)
    for name, want in (("mean", want_mean), ("logvar", want_logvar), ("decoded", want_dec)):
        assert float(want.std()) > 0.05, f"degenerate diffusers output {name}"
    x_cl = jnp.asarray(video.transpose(0, 1, 3, 4, 2))
    mean, logvar = split_moments(encode_moments(vae, x_cl, chunked=False))  # one pass
    chunk_mean, chunk_logvar = split_moments(encode_moments(vae, x_cl, chunked=True))  # diffusers' chunks
    m, s = _stats(vae.cfg)
    latents = encode_video(vae, jnp.asarray(video))  # chunked, normalised
    z_bt = from_torch(z)
    decoded = decode_video(vae, (z_bt - m) / s)  # chunked: one latent frame at a time
    errs = {
        "mean": rel_err(mean, want_mean),
        "logvar": rel_err(logvar, want_logvar),
        "mean (chunked)": rel_err(chunk_mean, want_mean),
        "logvar (chunked)": rel_err(chunk_logvar, want_logvar),
        "latents (chunked, normalised)": rel_err(latents, (want_mean - m) / s),
        "decoded (chunked)": rel_err(decoded, want_dec),
    }
    print(
        f"\nWan VAE parity, {'2.2' if vae.cfg.is_residual else '2.1'} video (max abs diff / max abs expected):",
        {k: f"{v:.1e}" for k, v in errs.items()},
    )
    assert latents.shape == (B, 3, vae.cfg.z_dim, S // vae.cfg.spatial_compression, S // vae.cfg.spatial_compression)
    assert decoded.shape == video.shape and decoded.dtype == jnp.float32
    assert float(jnp.abs(decoded).max()) <= 1.0
    assert all(e < RTOL for e in errs.values()), errs


def test_images_match_diffusers(pair, video):
    model, vae = pair
    images = video[:, 0]
    with torch.no_grad():
        mean = model.encode(torch.from_numpy(images)[:, :, None]).latent_dist.mean[:, :, 0]
        z = torch.randn(mean.shape, generator=torch.Generator().manual_seed(4))
        dec = model.decode(z[:, :, None]).sample[:, :, 0]
    m, s = (a[:, 0] for a in _stats(vae.cfg))
    latents = encode_video(vae, jnp.asarray(images))
    decoded = decode_video(vae, (z.numpy() - m) / s)
    errs = {"latents": rel_err(latents, (mean.numpy() - m) / s), "decoded": rel_err(decoded, dec.numpy())}
    print(
        f"\nWan VAE parity, {'2.2' if vae.cfg.is_residual else '2.1'} images:", {k: f"{v:.1e}" for k, v in errs.items()}
    )
    assert latents.ndim == 4 and decoded.shape == images.shape
    assert all(e < RTOL for e in errs.values()), errs


def test_chunked_decode_of_a_long_video(pair):
    """Six latent frames (21 video frames): one latent frame at a time through the two jitted
    chunk programs equals one pass over the whole video and diffusers' own (chunked) decode."""
    model, vae = pair
    f = vae.cfg.spatial_compression
    z = np.random.default_rng(5).normal(size=(B, 6, vae.cfg.z_dim, S // f, S // f)).astype(np.float32)
    chunked = decode_video(vae, z)
    whole = decode_video(vae, z, chunked=False)
    m, s = _stats(vae.cfg)
    with torch.no_grad():
        want = from_torch(model.decode(to_torch(z * s + m)).sample)
    assert chunked.shape == (B, 21, 3, S, S)
    errs = {"chunked vs whole": rel_err(chunked, whole), "chunked vs diffusers": rel_err(chunked, want)}
    print("\nWan VAE long decode:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(e < RTOL for e in errs.values()), errs


def test_temporal_latent_scale(pair, video):
    """The reference (``Wan2.2-TI2V-5B-Diffusers:0.6``) multiplies normalised latent frames
    after the first by the scale on encode and divides them by it on decode."""
    model, vae = pair
    assert split_vae_name("Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6") == ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 0.6)
    assert split_vae_name("Wan-AI/Wan2.1-T2V-14B-Diffusers") == ("Wan-AI/Wan2.1-T2V-14B-Diffusers", None)
    plain = encode_video(vae, jnp.asarray(video))
    scaled = encode_video(vae, jnp.asarray(video), temporal_scale=0.6)
    np.testing.assert_allclose(np.asarray(scaled[:, 0]), np.asarray(plain[:, 0]), rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(scaled[:, 1:]), 0.6 * np.asarray(plain[:, 1:]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(decode_video(vae, scaled, temporal_scale=0.6)),
        np.asarray(decode_video(vae, plain)),
        rtol=0,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(apply_temporal_scale(scaled, 0.6, inverse=True)), np.asarray(plain), rtol=1e-6, atol=1e-6
    )
    cfg = wan_from_diffusers(model, temporal_latent_scale=0.6).cfg
    assert cfg.temporal_latent_scale == 0.6 and cfg == WanVAEConfig(
        **{**FORMS[_form(vae)], "temporal_latent_scale": 0.6}
    )


def _form(vae) -> str:
    return "wan2.2" if vae.cfg.is_residual else "wan2.1"


def _params(vae):
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


def test_convert_from_saved_directory(pair, tmp_path):
    model, vae = pair
    model.save_pretrained(tmp_path / "vae")  # a pipeline directory: <dir>/vae/config.json
    want = _params(vae)
    for source in (tmp_path / "vae", tmp_path):
        got = _params(wan_from_diffusers(source))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def test_bad_checkpoints_raise_one_clear_error(pair):
    model, vae = pair
    config = dict(model.config)
    sd = dict(model.state_dict())
    missing = "decoder.up_blocks.0.resnets.1.conv2.weight"
    bad_shape = "encoder.conv_in.weight"
    nan_key = "decoder.conv_out.bias"
    del sd[missing]
    sd[bad_shape] = torch.zeros(8, 3, 1, 3, 3)
    sd[nan_key] = torch.full_like(sd[nan_key], float("nan"))
    sd["encoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(StateDictMismatch) as info:
        wan_from_diffusers(sd, config)
    msg = str(info.value)
    for key in (missing, bad_shape, nan_key, "encoder.extra.weight"):
        assert key in msg, key
    # the other form's checkpoint: one error listing the differences
    other = FORMS["wan2.1" if vae.cfg.is_residual else "wan2.2"]
    with pytest.raises(StateDictMismatch, match="missing keys|unexpected keys|mis-shaped"):
        wan_from_diffusers(model.state_dict(), other)
    with pytest.raises(ValueError, match="needs its config"):
        wan_from_diffusers(dict(model.state_dict()))


def test_bad_inputs(pair):
    _, vae = pair
    f = vae.cfg.spatial_compression
    with pytest.raises(ValueError, match="channels"):
        encode_video(vae, jnp.zeros((1, 5, 4, S, S)))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        encode_video(vae, jnp.zeros((1, 6, 3, S, S)))
    with pytest.raises(ValueError, match="multiples of"):
        encode_video(vae, jnp.zeros((1, 5, 3, S + f // 2, S)))
    with pytest.raises(ValueError, match="rank 3"):
        encode_video(vae, jnp.zeros((3, S, S)))
    with pytest.raises(ValueError, match="z_dim"):
        decode_video(vae, jnp.zeros((1, 2, vae.cfg.z_dim + 1, 2, 2)))
    with pytest.raises(ValueError, match="rank 6"):
        vae.decode(jnp.zeros((1, 2, vae.cfg.z_dim, 2, 2, 1)))


def test_config_validation():
    cfg = WanVAEConfig.from_diffusers_config(
        {**FORMS["wan2.2"], "_class_name": "AutoencoderKLWan", "clip_output": False, "attn_scales": [], "dropout": 0.0}
    )
    assert (cfg.spatial_compression, cfg.temporal_compression, cfg.pixel_channels) == (16, 4, 3)
    assert cfg.decoder_dims() == [24, 24, 24, 24, 12]
    assert WanVAEConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    default = WanVAEConfig()  # diffusers' defaults: the Wan2.1 VAE
    assert (default.z_dim, default.spatial_compression, len(default.latents_mean)) == (16, 8, 16)
    bad = [
        ({"norm_type": "x"}, "unknown keys \\['norm_type'\\]"),
        ({"attn_scales": [1.0]}, "attn_scales"),
        ({"temperal_downsample": [True, True]}, "one entry per downsampling level"),
        ({"temperal_downsample": [True, True, True], "scale_factor_temporal": 8}, "at most 2"),
        ({"latents_mean": [0.0] * 3}, "latents_mean"),
        ({"scale_factor_spatial": 8}, "scale_factor_spatial"),
        ({"in_channels": 3}, "patch_size"),
        (
            {"dim_mult": [1, 2], "temperal_downsample": [True], "scale_factor_temporal": 2, "scale_factor_spatial": 4},
            "shortcut",
        ),
    ]
    for change, match in bad:
        with pytest.raises(WanVAEConfigError, match=match):
            WanVAEConfig.from_diffusers_config({**FORMS["wan2.2"], **change})


def test_abstract_construction_and_dtypes():
    """Built abstractly (no initialisation compiled); bfloat16 compute keeps float32 parameters.
    (Eager random initialisation compiles one program per parameter shape: slow on a small CPU.)"""
    for dtype in ("float32", "bfloat16"):
        cfg = WanVAEConfig(**{**FORMS["wan2.2"], "dtype": dtype})
        vae = nnx.eval_shape(lambda cfg=cfg: AutoencoderKLWan(cfg, rngs=nnx.Rngs(0)))
        params = nnx.state(vae, nnx.Param)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
        assert vae.encoder.conv_in.kernel.shape == (3, 3, 3, 12, 8)
        assert vae.decoder.up_blocks[0].upsampler.time_conv.kernel.shape == (3, 1, 1, 24, 48)
