"""The KL autoencoder (SD-VAE) against diffusers' ``AutoencoderKL`` on small random models:
posterior moments, decoder output and round trip within 1e-4 relative in float32;
conversion from a ``save_pretrained`` directory; clear errors for bad state dicts and configs.

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
    AutoencoderKL,
    VAEConfig,
    VAEConfigError,
    decode_latents,  # noqa: E402
    encode_latents,
    vae_from_diffusers,
)
from starflow_jax.interop.named_tensors import StateDictMismatch  # noqa: E402

RTOL = 1e-4
SMALL = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
    shift_factor=0.0625,
)


def _randomize(model) -> None:
    """Non-trivial weights everywhere: norms away from (1, 0), peaked attention."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
            elif ".to_q." in name or ".to_k." in name:
                p.mul_(3.0)


@pytest.fixture(scope="module")
def torch_vae():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**SMALL).eval()
    _randomize(model)
    return model


@pytest.fixture(scope="module")
def jax_vae(torch_vae):
    return vae_from_diffusers(torch_vae.state_dict(), dict(torch_vae.config))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_posterior_and_decoder_match_diffusers(torch_vae, jax_vae, images):
    with torch.no_grad():
        post = torch_vae.encode(torch.from_numpy(images)).latent_dist
        z = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(2))
        dec = torch_vae.decode(z).sample
    for name, want in (("mean", post.mean), ("logvar", post.logvar), ("decoded", dec)):
        assert float(want.std()) > 0.05, f"degenerate diffusers output {name}"
    encode = nnx.jit(lambda m, x: m.encode(x))
    decode = nnx.jit(lambda m, z: m.decode(z))
    mean, logvar = encode(jax_vae, jnp.asarray(images))
    out = decode(jax_vae, jnp.asarray(z.numpy()))
    errs = {
        "mean": rel_err(mean, post.mean.numpy()),
        "logvar": rel_err(logvar, post.logvar.numpy()),
        "decoded": rel_err(out, dec.numpy()),
    }
    print("\nVAE parity (max abs diff / max abs expected):", errs)
    assert mean.dtype == logvar.dtype == out.dtype == jnp.float32
    assert all(e < RTOL for e in errs.values()), errs


def test_round_trip_matches_diffusers(torch_vae, jax_vae, images):
    cfg = jax_vae.cfg
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.18215, 0.0625)
    latents = encode_latents(jax_vae, jnp.asarray(images))
    assert latents.shape == (2, 4, 16, 16)
    recon = decode_latents(jax_vae, latents)
    with torch.no_grad():
        mean = torch_vae.encode(torch.from_numpy(images)).latent_dist.mean
        want_latents = (mean - 0.0625) * 0.18215
        want = torch_vae(torch.from_numpy(images)).sample
    err_latents, err_recon = rel_err(latents, want_latents.numpy()), rel_err(recon, want.numpy())
    print(f"\nVAE round trip: latents {err_latents:.2e}, reconstruction {err_recon:.2e}")
    assert recon.shape == images.shape
    assert err_latents < RTOL and err_recon < RTOL
    np.testing.assert_allclose(np.asarray(jax_vae(jnp.asarray(images))), np.asarray(recon), rtol=0, atol=1e-5)


def test_posterior_sample(jax_vae, images):
    x = jnp.asarray(images)
    mean, logvar = jax_vae.encode(x)
    key = jax.random.key(0)
    a, b = encode_latents(jax_vae, x, key), encode_latents(jax_vae, x, key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    z = a / jax_vae.cfg.scaling_factor + jax_vae.cfg.shift_factor
    eps = (z - mean) / jnp.exp(0.5 * logvar)
    np.testing.assert_allclose(np.asarray(eps), np.asarray(jax.random.normal(key, mean.shape)), atol=1e-3)


def test_convert_from_saved_directory(torch_vae, jax_vae, images, tmp_path):
    torch_vae.save_pretrained(tmp_path / "st")
    torch_vae.save_pretrained(tmp_path / "bin", safe_serialization=False)
    want = np.asarray(jax_vae.encode(jnp.asarray(images))[0])
    for sub in ("st", "bin"):
        vae = vae_from_diffusers(tmp_path / sub)
        assert vae.cfg == jax_vae.cfg
        np.testing.assert_array_equal(np.asarray(vae.encode(jnp.asarray(images))[0]), want)


def test_deprecated_attention_names(torch_vae, jax_vae, images):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in torch_vae.state_dict().items():
        for new, dep in old.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{dep}.")
                v = v[:, :, None, None] if k.endswith("weight") else v  # stored as a 1x1 conv
        sd[k] = v
    assert any(".proj_attn.weight" in k for k in sd)
    vae = vae_from_diffusers(sd, dict(torch_vae.config))
    np.testing.assert_array_equal(
        np.asarray(vae.decode(jnp.ones((1, 4, 16, 16)))), np.asarray(jax_vae.decode(jnp.ones((1, 4, 16, 16))))
    )


def test_bad_state_dict_raises_one_clear_error(torch_vae):
    config = dict(torch_vae.config)
    sd = dict(torch_vae.state_dict())
    missing = "decoder.up_blocks.0.resnets.1.conv2.weight"
    bad_shape = "encoder.conv_in.weight"
    nan_key = "decoder.conv_out.bias"
    del sd[missing]
    sd[bad_shape] = torch.zeros(32, 3, 5, 5)
    sd[nan_key] = torch.full_like(sd[nan_key], float("nan"))
    sd["encoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(StateDictMismatch) as info:
        vae_from_diffusers(sd, config)
    msg = str(info.value)
    print("\n" + msg)
    assert isinstance(info.value, ValueError)
    for key in (missing, bad_shape, nan_key, "encoder.extra.weight", "(32, 3, 3, 3)"):
        assert key in msg, key
    with pytest.raises(ValueError, match="needs its config"):
        vae_from_diffusers(dict(torch_vae.state_dict()))


def test_config_validation():
    cfg = VAEConfig.from_diffusers_config({**SMALL, "_class_name": "AutoencoderKL", "force_upcast": True})
    assert cfg.block_out_channels == (32, 64) and cfg.downsample_factor == 2
    with pytest.raises(VAEConfigError, match="down_block_types"):
        VAEConfig.from_diffusers_config({**SMALL, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
    with pytest.raises(VAEConfigError, match="unknown or unsupported config keys: \\['norm_type'\\]"):
        VAEConfig.from_diffusers_config({**SMALL, "norm_type": "spatial"})
    with pytest.raises(VAEConfigError, match="latents_mean"):
        VAEConfig.from_diffusers_config({**SMALL, "latents_mean": [0.0] * 4})
    with pytest.raises(VAEConfigError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(30,), norm_num_groups=8)
    with pytest.raises(VAEConfigError, match="act_fn"):
        VAEConfig(act_fn="gelu")


def test_bfloat16_compute_float32_params(torch_vae, jax_vae, images):
    vae = vae_from_diffusers(torch_vae.state_dict(), dict(torch_vae.config), dtype="bfloat16")
    params = jax.tree.leaves(nnx.state(vae, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    mean, _ = vae.encode(jnp.asarray(images))
    want, _ = jax_vae.encode(jnp.asarray(images))
    assert mean.dtype == jnp.float32
    assert rel_err(mean, want) < 0.1


def test_bad_input_shapes():
    vae = AutoencoderKL(VAEConfig(**{k: v for k, v in SMALL.items() if "block_types" not in k}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels"):
        vae.encode(jnp.zeros((1, 4, 32, 32)))
    with pytest.raises(ValueError, match="rank 3"):
        vae.decode(jnp.zeros((4, 16, 16)))
