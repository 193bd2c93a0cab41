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
