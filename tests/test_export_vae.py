"""Our ``AutoencoderKL`` written as a diffusers directory: diffusers'
``AutoencoderKL.from_pretrained`` reads it and decodes like ours (1e-5), our loader reads
it back exactly, and an existing non-empty directory is never overwritten.

Nothing is downloaded: a small random diffusers model is built from a config."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the diffusers round trip needs torch")
diffusers = pytest.importorskip("diffusers", reason="the diffusers round trip needs diffusers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from starflow_jax.autoencoders import VAEConfig, vae_from_diffusers  # noqa: E402
from starflow_jax.autoencoders.export_vae import export_vae_to_diffusers  # noqa: E402
from starflow_jax.autoencoders.loading import load_autoencoder  # noqa: E402

SMALL = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=16,
    shift_factor=0.0625,
)


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**SMALL).eval()
    with torch.no_grad():  # norms away from (1, 0) so that a swapped name would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape))
    return vae_from_diffusers(model.state_dict(), dict(model.config))


def test_export_reloads_in_diffusers_and_ours(ours, tmp_path):
    out = tmp_path / "vae"
    export_vae_to_diffusers(ours, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["shift_factor"] == 0.0625

    theirs = diffusers.AutoencoderKL.from_pretrained(out).eval()
    assert VAEConfig.from_diffusers_config(dict(theirs.config)) == ours.cfg
    z = np.random.default_rng(0).normal(size=(2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = theirs.decode(torch.from_numpy(z)).sample.numpy()
    got = np.asarray(nnx.jit(lambda m, z: m.decode(z))(ours, z))
    assert float(np.abs(want).std()) > 0.05
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    back = load_autoencoder(str(out)).model
    assert back.cfg == ours.cfg
    a, b = nnx.state(ours, nnx.Param), nnx.state(back, nnx.Param)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_export_never_overwrites(ours, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_vae_to_diffusers(ours, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_vae_to_diffusers(ours, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    export_vae_to_diffusers(ours, tmp_path / "empty")  # an existing empty directory is fine


WAN_FORMS = {
    "wan2.1": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[1.5, 0.8, 1.0, 2.0],
    ),
    "wan2.2": dict(  # residual blocks, patchified pixels, a wider decoder
        base_dim=8,
        decoder_base_dim=12,
        z_dim=8,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        latents_mean=[0.1] * 8,
        latents_std=[1.2] * 8,
    ),
}


@pytest.mark.parametrize("form", sorted(WAN_FORMS))
def test_wan_export_reloads_in_diffusers_exactly(form, tmp_path):
    """Our AutoencoderKLWan written back: diffusers reads the same config and, to the bit,
    the same weights it was converted from (RMS-norm gammas in both of diffusers' shapes)."""
    from starflow_jax.autoencoders import wan_from_diffusers

    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(**WAN_FORMS[form]).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # gammas away from 1 so that a wrong layout or name would show
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    out = export_vae_to_diffusers(wan_from_diffusers(model), tmp_path / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKLWan"
    theirs = diffusers.AutoencoderKLWan.from_pretrained(out).eval()
    strip = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert strip(theirs.config) == strip(model.config)
    want, got = model.state_dict(), theirs.state_dict()
    assert sorted(want) == sorted(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    if form == "wan2.1":  # and decodes as ours does
        ours = load_autoencoder(str(out)).model
        z = np.random.default_rng(0).normal(size=(1, 2, 4, 2, 2)).astype(np.float32)
        with torch.no_grad():
            ref = theirs.decode(torch.from_numpy(z.transpose(0, 2, 1, 3, 4))).sample.numpy().transpose(0, 2, 1, 3, 4)
        np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, z: m.decode(z))(ours, z)), ref, atol=1e-5, rtol=0)
