"""The decoder fine-tuning losses (``starflow_jax.autoencoders.finetune``): the wavelet,
hinge and LeCam math on hand-computed numbers, the networks' shapes, weight loading and its
errors; and, with a reference checkout (``STARFLOW_REFERENCE_REPO``) and torchvision, parity
with the reference's own ``misc/`` modules under the same random weights.

The parity tests build the reference's ``ReconstructionLoss_Single_Stage`` without any
download: torchvision's ``vgg16`` / ``convnext_small`` are replaced, in the reference's
modules only, by functions returning networks built with ``weights=None`` (then perturbed),
and ``LPIPS.load_pretrained`` (which reads ``/root/.cache/vgg.pth``) by a no-op, so that the
lpips heads keep their random init (made non-negative, as the released heads are). The
reference's wavelet loss imports ``torch_dwt`` (a git-only dependency, KeKsBoTer/torch-dwt):
its test is skipped where that is not installed. Each parity test prints its relative
error (``pytest -s`` shows them)."""

import importlib
import os
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starflow_jax.autoencoders.finetune import convnext as convnext_lib
from starflow_jax.autoencoders.finetune import discriminator as disc_lib
from starflow_jax.autoencoders.finetune import losses
from starflow_jax.autoencoders.finetune import lpips as lpips_lib
from starflow_jax.autoencoders.finetune.wavelet import haar_dwt3, wavelet_loss
from starflow_jax.config import ConfigError
from starflow_jax.config.decoder_loss import DECODER_LOSS_DEFAULTS, decoder_loss_section
from starflow_jax.interop.named_tensors import StateDictMismatch

TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)
TINY_DISCRIMINATOR = dict(hidden_channels=32)


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _batch(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, shape).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.15, shape), 0, 1).astype(np.float32)
    return x, y


def _torch_shape(shape, layout):
    """The torch-layout shape of one of our leaves (``weights``' layouts)."""
    if layout is False:
        return tuple(shape)
    axes = tuple(reversed(range(len(shape)))) if layout is True else tuple(layout)
    return tuple(shape[axes.index(i)] for i in range(len(shape)))


def _random_torch_state(make, torch_name, seed=0, scale=0.1):
    """A random state dict, by the torch names and layouts, for the module ``make()`` builds:
    loading it is how these tests build networks (no per-parameter random-init compiles)."""
    rng = np.random.default_rng(seed)
    _, state = nnx.split(nnx.eval_shape(make))
    out = {}
    for path, var in nnx.to_flat_state(state):
        name, layout = torch_name(tuple(str(p) for p in path))
        value = var.get_value() if hasattr(var, "get_value") else var
        out[name] = rng.normal(0.0, scale, _torch_shape(value.shape, layout)).astype(np.float32)
    return out


def _make_tiny_networks():
    """Our three networks, small (the discriminator 32 channels wide, a 4-block ConvNeXt; LPIPS
    is VGG16 as it is), from random torch-named state dicts."""
    d_state = _random_torch_state(
        lambda: disc_lib.PatchDiscriminator(**TINY_DISCRIMINATOR, rngs=nnx.Rngs(0)), disc_lib.torch_name
    )
    c_state = _random_torch_state(
        lambda: convnext_lib.ConvNeXt(**TINY_CONVNEXT, rngs=nnx.Rngs(0)), convnext_lib.torch_name
    )
    l_state = _random_torch_state(lambda: lpips_lib.LPIPS(rngs=nnx.Rngs(0)), lpips_lib.torch_name, scale=0.05)
    heads = {k: np.abs(v) for k, v in l_state.items() if k.startswith("lin")}
    return dict(
        discriminator=disc_lib.load_discriminator(d_state, **TINY_DISCRIMINATOR),
        convnext=convnext_lib.load_convnext(c_state, **TINY_CONVNEXT),
        lpips=lpips_lib.load_lpips(l_state, heads),
    )


@pytest.fixture(scope="module")
def tiny_networks():
    return _make_tiny_networks()


# ---------------------------------------------------------------- wavelet


def test_wavelet_loss_is_zero_for_equal_videos_and_symmetric():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (2, 2, 4, 3, 6, 8)).astype(np.float32)
    assert float(wavelet_loss(x, x)) == 0.0
    np.testing.assert_allclose(float(wavelet_loss(x, y)), float(wavelet_loss(y, x)), rtol=1e-7)


def test_wavelet_loss_of_a_constant_video():
    # a constant c: only the all-low-pass band is non-zero, c * (2 / sqrt 2)^3 = 2 sqrt(2) c,
    # one of 8 coefficients per 2x2x2 cube
    c = 0.75
    got = wavelet_loss(np.full((1, 2, 3, 4, 4), c, np.float32), np.zeros((1, 2, 3, 4, 4), np.float32))
    np.testing.assert_allclose(float(got), 2 * np.sqrt(2) * c / 8, rtol=1e-6)


def test_wavelet_loss_pads_odd_axes_with_a_zero_at_the_end():
    # t = h = 1 (each padded to 2: low and high both x / sqrt 2), w = 3: pairs (a, b), (c, 0)
    a, b, c = 1.0, 2.0, 3.0
    x = np.array([a, b, c], np.float32).reshape(1, 1, 1, 1, 3)
    want = (abs(a + b) + abs(a - b) + 2 * abs(c)) * 4 / (2 * np.sqrt(2)) / 16
    np.testing.assert_allclose(float(wavelet_loss(x, np.zeros_like(x))), want, rtol=1e-6)
    assert haar_dwt3(x, (1, 3, 4)).shape == (8, 1, 1, 1, 1, 2)


def test_haar_dwt3_is_orthonormal_on_even_sizes():
    x = np.random.default_rng(0).normal(size=(2, 4, 3, 6, 8)).astype(np.float32)
    bands = np.asarray(haar_dwt3(x, (1, 3, 4)), np.float64)
    assert bands.shape == (8, 2, 2, 3, 3, 4)
    np.testing.assert_allclose(np.sum(bands**2), np.sum(x.astype(np.float64) ** 2), rtol=1e-5)


def test_wavelet_loss_rejects_images():
    with pytest.raises(ValueError, match=r"\(b, t, c, h, w\)"):
        wavelet_loss(np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 8)))


# ---------------------------------------------------------------- hinge, LeCam, totals


def test_hinge_and_lecam_on_hand_numbers():
    real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.5])
    # real: relu(1 - [2, 0.5]) = [0, 0.5] -> 0.25; fake: relu(1 + [-2, 0.5]) = [0, 1.5] -> 0.75
    np.testing.assert_allclose(float(losses.hinge_discriminator_loss(real, fake)), 0.5, rtol=1e-7)
    state = losses.LeCamState(jnp.float32(0.3), jnp.float32(0.1))
    # relu(1.25 - 0.1)^2 + relu(0.3 - (-0.75))^2
    np.testing.assert_allclose(float(losses.lecam_loss(1.25, -0.75, state)), 1.15**2 + 1.05**2, rtol=1e-6)
    assert float(losses.lecam_loss(-1.0, 1.0, state)) == 0.0
    new = losses.update_lecam_state(state, jnp.float32(1.25), jnp.float32(-0.75), 0.999)
    np.testing.assert_allclose(float(new.ema_real_logits_mean), 0.3 * 0.999 + 1.25 * 0.001, rtol=1e-6)
    np.testing.assert_allclose(float(new.ema_fake_logits_mean), 0.1 * 0.999 - 0.75 * 0.001, rtol=1e-6)


def test_discriminator_terms_apply_lecam_from_the_old_emas_and_whatever_the_factor():
    real, fake = jnp.array([[2.0], [0.5]]), jnp.array([[-2.0], [0.5]])
    state = losses.LeCamState(jnp.float32(0.3), jnp.float32(0.1))
    total, terms, new = losses.discriminator_terms(real, fake, state, jnp.float32(1.0))
    lecam = 0.001 * (1.15**2 + 1.05**2)
    np.testing.assert_allclose(float(total), 0.5 + lecam, rtol=1e-6)
    np.testing.assert_allclose(float(terms["lecam_loss"]), lecam, rtol=1e-6)
    assert set(terms) == {"discriminator_loss", "logits_real", "logits_fake", "lecam_loss"}
    np.testing.assert_allclose(float(new.ema_real_logits_mean), 0.3 * 0.999 + 1.25 * 0.001, rtol=1e-6)
    before_start, _, _ = losses.discriminator_terms(real, fake, state, jnp.float32(0.0))
    np.testing.assert_allclose(float(before_start), lecam, rtol=1e-6)
    off = decoder_loss_section(lecam_weight=0.0)
    total, terms, new = losses.discriminator_terms(real, fake, state, jnp.float32(1.0), off)
    np.testing.assert_allclose(float(total), 0.5, rtol=1e-7)
    assert new is state


def test_generator_terms_on_hand_numbers():
    fake = jnp.array([[0.2], [-0.6]])  # -mean = 0.2
    total, terms = losses.generator_terms(
        jnp.float32(0.05), jnp.float32(0.3), fake, jnp.float32(0.4), losses.discriminator_factor(5)
    )
    want = 0.05 + 1.1 * 0.3 + 0.1 * 1.0 * 0.2 + 0.5 * 0.4
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    assert set(terms) == {
        "total_loss",
        "reconstruction_loss",
        "perceptual_loss",
        "weighted_gan_loss",
        "discriminator_factor",
        "d_weight",
        "gan_loss",
        "wavelet_loss",
    }
    np.testing.assert_allclose(float(terms["weighted_gan_loss"]), 0.02, rtol=1e-6)
    np.testing.assert_allclose(float(terms["wavelet_loss"]), 0.2, rtol=1e-6)
    late = decoder_loss_section(discriminator_start=10)
    total, terms = losses.generator_terms(0.05, 0.3, fake, 0.0, losses.discriminator_factor(5, late), late)
    np.testing.assert_allclose(float(total), 0.05 + 1.1 * 0.3, rtol=1e-6)
    assert float(terms["gan_loss"]) == 0.0 and float(terms["discriminator_factor"]) == 0.0


def test_perceptual_and_reconstruction_weights():
    lp = jnp.array([0.2, 0.4])
    np.testing.assert_allclose(float(losses.perceptual_loss(lp, jnp.float32(1.0))), (0.3 + 0.1) / 1.1, rtol=1e-6)
    x, y = jnp.zeros((1, 3, 2, 2)), jnp.full((1, 3, 2, 2), 0.5)
    np.testing.assert_allclose(float(losses.reconstruction_loss(x, y)), 0.25, rtol=1e-7)
    np.testing.assert_allclose(
        float(losses.reconstruction_loss(x, y, decoder_loss_section(reconstruction="l1", logvar=np.log(2.0)))),
        0.25,
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="'l2' or 'l1'"):
        losses.reconstruction_loss(x, y, decoder_loss_section(reconstruction="huber"))


def test_decoder_loss_section_defaults_and_unknown_keys():
    s = decoder_loss_section()
    assert (s.perceptual_weight, s.lpips_weight, s.convnext_weight) == (1.1, 1.0, 0.1)
    assert (s.discriminator_weight, s.lecam_weight, s.lecam_ema_decay, s.wavelet_weight) == (0.1, 0.001, 0.999, 0.5)
    assert decoder_loss_section(wavelet_weight=0.0).wavelet_weight == 0.0
    with pytest.raises(ConfigError, match="wavelet_wieght"):
        decoder_loss_section(wavelet_wieght=1.0)
    assert set(DECODER_LOSS_DEFAULTS) == set(s)


# ---------------------------------------------------------------- networks: shapes, pooling


def test_adaptive_max_pool_windows_match_torchs_rule():
    x = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
    # windows of 5 -> 3: [0, 2), [1, 4), [3, 5)
    want = np.array([[6, 8, 9], [16, 18, 19], [21, 23, 24]], np.float32)
    np.testing.assert_array_equal(np.asarray(disc_lib.adaptive_max_pool(x, (3, 3)))[0, :, :, 0], want)
    small = jnp.arange(4, dtype=jnp.float32).reshape(1, 2, 2, 1)
    up = np.asarray(disc_lib.adaptive_max_pool(small, (4, 4)))[0, :, :, 0]  # a smaller input repeats pixels
    np.testing.assert_array_equal(up, np.repeat(np.repeat([[0, 1], [2, 3]], 2, 0), 2, 1))


def test_blur_downsample_keeps_a_constant_inside_and_halves_the_size():
    out = disc_lib.blur_downsample(jnp.ones((1, 9, 8, 2)))
    assert out.shape == (1, 5, 4, 2)
    np.testing.assert_allclose(np.asarray(out)[0, 1:-1, 1:-1], 1.0, rtol=1e-6)


def test_discriminator_logit_shapes(tiny_networks):
    d = tiny_networks["discriminator"]
    shape = lambda x: nnx.eval_shape(lambda d, x: d(x), d, x).shape  # noqa: E731
    assert shape(jax.ShapeDtypeStruct((2, 3, 32, 32), jnp.float32)) == (2, 1, 16, 16)
    assert shape(jax.ShapeDtypeStruct((1, 2, 3, 36, 44), jnp.float32)) == (2, 1, 16, 16)  # video frames scored alone
    assert shape(jax.ShapeDtypeStruct((1, 3, 256, 256), jnp.float32)) == (1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"\(b, 3, h, w\)"):
        d(np.zeros((2, 4, 32, 32), np.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        disc_lib.PatchDiscriminator(hidden_channels=48, rngs=nnx.Rngs(0))


def test_unit_normalize_has_finite_gradients_at_zero_features():
    f = jnp.zeros((2, 3, 4))
    grad = jax.grad(lambda f: jnp.sum(lpips_lib.unit_normalize(f) ** 2))(f)
    assert np.all(np.isfinite(np.asarray(grad)))
    g = jnp.array([[3.0, 4.0]])
    np.testing.assert_allclose(np.asarray(lpips_lib.unit_normalize(g)), [[0.6, 0.8]], rtol=1e-6)


def test_losses_on_tiny_networks(tiny_networks):
    nets = tiny_networks
    x, y = _batch((2, 3, 16, 16))
    generator = nnx.jit(lambda nets, x, y: losses.generator_loss(x, y, **nets, step=0))
    total, terms = jax.device_get(generator(nets, x, y))
    assert {"lpips", "convnext", "total_loss", "gan_loss"} <= set(terms)
    assert float(terms["wavelet_loss"]) == 0.0  # images: no wavelet term, as in the reference
    parts = ("reconstruction_loss", "perceptual_loss", "weighted_gan_loss", "wavelet_loss")
    np.testing.assert_allclose(float(total), float(sum(terms[k] for k in parts)), rtol=1e-6)
    assert float(terms["lpips"]) > 0 and float(terms["convnext"]) > 0
    _, same = jax.device_get(generator(nets, x, x))  # equal images: no reconstruction or perceptual difference
    assert float(same["reconstruction_loss"]) == 0.0 and float(same["convnext"]) == 0.0
    np.testing.assert_allclose(float(same["lpips"]), 0.0, atol=1e-7)
    d_total, d_terms, lecam = nnx.jit(
        lambda d, x, y: losses.discriminator_loss(x, y, discriminator=d, lecam_state=losses.init_lecam_state(), step=0)
    )(nets["discriminator"], x, y)
    assert np.isfinite(float(d_total)) and float(lecam.ema_real_logits_mean) != 0.0
    np.testing.assert_allclose(float(lecam.ema_real_logits_mean), 0.001 * float(d_terms["logits_real"]), rtol=1e-5)


def test_generator_loss_on_videos_adds_the_wavelet_term_and_scores_frames(tiny_networks):
    seen = {}

    def lpips(a, b):  # stand-ins for the perceptual networks: record the frames they get
        seen["lpips"] = a.shape
        return jnp.mean(jnp.square(a - b), axis=(1, 2, 3))

    def convnext(images):
        seen["convnext"] = images.shape
        return images.mean(axis=(1, 2))

    x, y = _batch((1, 3, 3, 8, 8))
    _, terms = nnx.jit(
        lambda d, x, y: losses.generator_loss(x, y, lpips=lpips, convnext=convnext, discriminator=d, step=0)
    )(tiny_networks["discriminator"], x, y)
    assert seen == {"lpips": (3, 3, 8, 8), "convnext": (6, 224, 224, 3)}  # b * t frames (twice for ConvNeXt)
    np.testing.assert_allclose(float(terms["wavelet_loss"]), 0.5 * float(wavelet_loss(x, y)), rtol=1e-6)
    assert float(terms["wavelet_loss"]) > 0


# ---------------------------------------------------------------- weight loading errors


def test_discriminator_loading_round_trip_and_errors(tmp_path):
    make = lambda: disc_lib.PatchDiscriminator(**TINY_DISCRIMINATOR, rngs=nnx.Rngs(0))  # noqa: E731
    state = _random_torch_state(make, disc_lib.torch_name)
    assert "blocks.3.1.weight" in state and "to_logits.2.weight" in state  # the reference's names
    d = disc_lib.load_discriminator(state, **TINY_DISCRIMINATOR)
    np.testing.assert_array_equal(
        np.asarray(d.stage_convs[1].kernel[...]), state["blocks.2.weight"].transpose(2, 3, 1, 0)
    )
    blur = np.outer([1, 3, 3, 1], [1, 3, 3, 1])[None, None] / 64.0
    disc_lib.load_discriminator({**state, "blocks.1.0.kernel": blur}, **TINY_DISCRIMINATOR)  # buffers accepted
    with pytest.raises(ValueError, match="blocks.1.0.kernel"):
        disc_lib.load_discriminator({**state, "blocks.1.0.kernel": blur * 2}, **TINY_DISCRIMINATOR)
    missing = {k: v for k, v in state.items() if k != "blocks.4.bias"}
    with pytest.raises(StateDictMismatch, match=r"missing keys.*blocks\.4\.bias"):
        disc_lib.load_discriminator(missing, **TINY_DISCRIMINATOR)
    bad = {**state, "block_in.0.weight": np.zeros((32, 3, 3, 3), np.float32)}
    with pytest.raises(StateDictMismatch, match=r"block_in\.0\.weight: got \(32, 3, 3, 3\), expected \(32, 3, 5, 5\)"):
        disc_lib.load_discriminator(bad, **TINY_DISCRIMINATOR)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        disc_lib.load_discriminator(tmp_path / "nowhere.pth")


def test_discriminator_loads_from_a_pth_file(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed (reading .pth files needs it)")
    make = lambda: disc_lib.PatchDiscriminator(**TINY_DISCRIMINATOR, rngs=nnx.Rngs(0))  # noqa: E731
    state = _random_torch_state(make, disc_lib.torch_name)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "discriminator.pth")
    d = disc_lib.load_discriminator(tmp_path / "discriminator.pth", **TINY_DISCRIMINATOR)
    np.testing.assert_array_equal(np.asarray(d.logits_out.bias[...]), state["to_logits.2.bias"])


def test_clip_discriminator_shapes_and_losses_score_whole_clips():
    d = disc_lib.ClipDiscriminator(hidden_channels=32, num_stages=2, rngs=nnx.Rngs(0))
    shape = lambda x: nnx.eval_shape(lambda d, x: d(x), d, x).shape  # noqa: E731
    assert shape(jax.ShapeDtypeStruct((2, 5, 3, 32, 32), jnp.float32)) == (2, 1, 2, 16, 16)
    assert shape(jax.ShapeDtypeStruct((1, 9, 3, 20, 28), jnp.float32)) == (1, 1, 2, 16, 16)
    with pytest.raises(ValueError, match="scores whole clips"):
        d(np.zeros((2, 3, 16, 16), np.float32))
    assert d.temporal == (True, True)  # int(2 / 3) = 0 stages keep every frame
    assert disc_lib.ClipDiscriminator(hidden_channels=32, rngs=nnx.Rngs(0)).temporal == (False, True, True)
    x, y = _batch((2, 5, 3, 16, 16))
    _, terms, _ = losses.discriminator_loss(x, y, discriminator=d, lecam_state=losses.init_lecam_state(), step=0)
    want_real = float(jnp.mean(d(jnp.asarray(x))))  # one logit map per clip, not per frame
    np.testing.assert_allclose(float(terms["logits_real"]), want_real, rtol=1e-5)


def test_clip_discriminator_loading_names_and_layout():
    arch = dict(hidden_channels=32, num_stages=2)
    make = lambda: disc_lib.ClipDiscriminator(**arch, rngs=nnx.Rngs(0))  # noqa: E731
    state = _random_torch_state(make, disc_lib._torch_name_3d)
    assert state["blocks.2.weight"].shape == (64, 32, 3, 3, 3)  # torch's OIDHW
    blur = np.outer([1, 3, 3, 1], [1, 3, 3, 1])[None, None, None] / 64.0  # BlurBlock3D's (1, 1, 1, 4, 4) buffer
    d = disc_lib.load_clip_discriminator({**state, "blocks.1.0.kernel": blur}, **arch)
    np.testing.assert_array_equal(
        np.asarray(d.stage_convs[1].kernel[...]), state["blocks.2.weight"].transpose(2, 3, 4, 1, 0)
    )


def test_parity_clip_discriminator_logits():
    """The reference's NLayer3DDiscriminator (misc/discriminator.py needs torch and einops only)."""
    repo = os.environ.get("STARFLOW_REFERENCE_REPO")
    if not repo:
        pytest.skip("STARFLOW_REFERENCE_REPO is unset: no apple/ml-starflow checkout to compare with")
    torch = pytest.importorskip("torch", reason="torch not installed")
    pytest.importorskip("einops", reason="einops not installed (the reference's misc/ imports it)")
    if repo not in sys.path:
        sys.path.insert(0, repo)
    ref_lib = importlib.import_module("misc.discriminator")
    for arch in (dict(hidden_channels=32, num_stages=2), dict(hidden_channels=32, num_stages=3, blur_kernel_size=3)):
        torch.manual_seed(0)
        ref = ref_lib.NLayer3DDiscriminator(num_channels=3, **arch).eval()
        with torch.no_grad():  # norms and biases away from their initial values
            for _, p in ref.named_parameters():
                if p.ndim == 1:
                    p.normal_(0.5, 0.3)
        ours = disc_lib.load_clip_discriminator(ref.state_dict(), **arch)
        for shape in [(2, 5, 3, 32, 32), (1, 9, 3, 20, 28), (1, 1, 3, 16, 16)]:
            x, _ = _batch(shape)
            with torch.no_grad():
                want = ref(torch.from_numpy(x)).numpy()
            with jax.default_matmul_precision("highest"):
                got = np.asarray(ours(jnp.asarray(x)))
            assert got.shape == want.shape
            rel = float(np.abs(got - want).max() / np.abs(want).max())
            assert rel < 1e-5, (arch, shape, rel)


def test_lpips_loading_errors_name_the_file_or_tensor(tmp_path):
    state = _random_torch_state(lambda: lpips_lib.LPIPS(rngs=nnx.Rngs(0)), lpips_lib.torch_name)
    vgg = {k: v for k, v in state.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = np.zeros((4, 4), np.float32)  # torchvision's classifier: ignored
    heads = {k: v for k, v in state.items() if k.startswith("lin")}
    assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
    lpips_lib.load_lpips(vgg, heads)
    with pytest.raises(FileNotFoundError, match=r"vgg\.pth.*no_heads\.pth"):
        lpips_lib.load_lpips(vgg, tmp_path / "no_heads.pth")
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        lpips_lib.load_lpips(tmp_path / "missing_vgg.pth", heads)
    with pytest.raises(StateDictMismatch, match=r"lin3\.model\.1\.weight"):
        lpips_lib.load_lpips(vgg, {k: v for k, v in heads.items() if not k.startswith("lin3")})
    with pytest.raises(StateDictMismatch, match=r"features\.28\.weight: got \(512, 256, 3, 3\)"):
        lpips_lib.load_lpips({**vgg, "features.28.weight": np.zeros((512, 256, 3, 3), np.float32)}, heads)


def test_convnext_loading_names_and_errors(tmp_path):
    make = lambda: convnext_lib.ConvNeXt(**TINY_CONVNEXT, rngs=nnx.Rngs(0))  # noqa: E731
    state = _random_torch_state(make, convnext_lib.torch_name)
    for name in (
        "features.0.0.weight",
        "features.0.1.weight",
        "features.2.0.bias",
        "features.6.1.weight",
        "features.5.0.block.0.weight",
        "features.5.0.block.3.weight",
        "features.7.0.layer_scale",
        "classifier.0.weight",
        "classifier.2.bias",
    ):
        assert name in state, name
    assert state["features.7.0.layer_scale"].shape == (64, 1, 1)
    net = convnext_lib.load_convnext(state, **TINY_CONVNEXT)
    np.testing.assert_array_equal(
        np.asarray(net.stages[3][0].layer_scale[...]).reshape(-1), state["features.7.0.layer_scale"].reshape(-1)
    )
    with pytest.raises(StateDictMismatch, match=r"features\.5\.0\.block\.5\.weight"):
        convnext_lib.load_convnext(
            {k: v for k, v in state.items() if k != "features.5.0.block.5.weight"}, **TINY_CONVNEXT
        )
    with pytest.raises(FileNotFoundError, match="convnext_small-0c510722.pth"):
        convnext_lib.load_convnext(tmp_path / "absent.pth")


def test_resize_matches_torch_antialiased_bilinear():
    torch = pytest.importorskip("torch", reason="torch not installed")
    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (256, 256), (300, 200)]:
        x = rng.uniform(0, 1, (2, 3, h, w)).astype(np.float32)
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=224, mode="bilinear", align_corners=False, antialias=True
        ).numpy()
        got = convnext_lib.resize_antialiased(jnp.asarray(x.transpose(0, 2, 3, 1)), 224)
        # torch's own float32 and float64 results differ by up to 2e-5 here
        np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=3e-5)


# ---------------------------------------------------------------- parity with the reference


def _reference_modules():
    repo = os.environ.get("STARFLOW_REFERENCE_REPO")
    if not repo:
        pytest.skip("STARFLOW_REFERENCE_REPO is unset: no apple/ml-starflow checkout to compare with")
    pytest.importorskip("torch", reason="torch not installed")
    pytest.importorskip(
        "torchvision",
        reason="torchvision not installed: the reference's LPIPS and ConvNeXt term build torchvision models "
        "(run these in a venv with torch + torchvision, e.g. torch==2.14.1 torchvision==0.29.1)",
    )
    pytest.importorskip("einops", reason="einops not installed (the reference's misc/ imports it)")
    if repo not in sys.path:
        sys.path.insert(0, repo)
    return importlib.import_module("misc.ae_losses"), importlib.import_module("misc.lpips")


def _perturb_convnext(model, torch):
    """torchvision's init leaves layer_scale at 1e-6 (blocks nearly off) and the norms at
    identity: randomise them so that every block and norm shapes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.1, 0.5)
            elif p.ndim == 1 and name.endswith(".weight"):  # the LayerNorms' scales
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)


@pytest.fixture(scope="module")
def reference():
    """The reference's loss module (random weights, no downloads), and ours with its weights."""
    ae_losses, lpips_mod = _reference_modules()
    import torch
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval()
    convnext = torchvision.models.convnext_small(weights=None).eval()
    _perturb_convnext(convnext, torch)
    saved = lpips_mod.models, ae_losses.models, lpips_mod.LPIPS.load_pretrained
    # the reference builds both with ImageNet weights (a download) and reads /root/.cache/vgg.pth
    lpips_mod.models = SimpleNamespace(
        vgg16=lambda weights=None: vgg, VGG16_Weights=SimpleNamespace(IMAGENET1K_V1=None)
    )
    ae_losses.models = SimpleNamespace(
        convnext_small=lambda weights=None: convnext, ConvNeXt_Small_Weights=SimpleNamespace(IMAGENET1K_V1=None)
    )
    lpips_mod.LPIPS.load_pretrained = lambda self: None
    try:
        module = ae_losses.ReconstructionLoss_Single_Stage(None, SimpleNamespace(use_3d_disc=0))
        convnext_only = ae_losses.PerceptualLoss(None, "convnext_s")
    finally:
        lpips_mod.models, ae_losses.models, lpips_mod.LPIPS.load_pretrained = saved
    ref_lpips = module.perceptual_loss.lpips
    with torch.no_grad():
        for k in range(5):  # the released heads are non-negative
            getattr(ref_lpips, f"lin{k}").model[1].weight.abs_()
    heads = {k: v for k, v in ref_lpips.state_dict().items() if k.startswith("lin")}
    ours = dict(
        lpips=lpips_lib.load_lpips(vgg.state_dict(), heads),
        convnext=convnext_lib.load_convnext(convnext.state_dict()),
        discriminator=disc_lib.load_discriminator(module.discriminator.state_dict()),
    )
    return SimpleNamespace(torch=torch, ae_losses=ae_losses, module=module, convnext_only=convnext_only, ours=ours)


def _report(term: str, rel: float, started: float):
    print(f"\nPARITY {term}: relative error {rel:.2e} ({time.time() - started:.0f} s)")
    assert rel < 1e-4, f"{term}: relative error {rel:.2e}"


def test_parity_discriminator_logits(reference):
    torch, start = reference.torch, time.time()
    for shape in [(2, 3, 32, 32), (2, 3, 36, 44)]:
        x, _ = _batch(shape)
        with torch.no_grad():
            want = reference.module.discriminator(torch.from_numpy(x)).numpy()
        got = reference.ours["discriminator"](jnp.asarray(x))
        assert got.shape == want.shape
        _report(f"discriminator logits {shape}", _rel(got, want), start)


def test_parity_lpips(reference):
    torch, start = reference.torch, time.time()
    x, y = _batch((2, 3, 64, 64))
    with torch.no_grad():
        want = reference.module.perceptual_loss.lpips(torch.from_numpy(x), torch.from_numpy(y)).numpy().reshape(-1)
    got = nnx.jit(lambda net, a, b: net(a, b))(reference.ours["lpips"], jnp.asarray(x), jnp.asarray(y))
    _report("LPIPS", _rel(got, want), start)


def test_parity_convnext_term(reference):
    torch, start = reference.torch, time.time()
    x, y = _batch((2, 3, 32, 32))
    with torch.no_grad():
        want = reference.convnext_only(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    got = nnx.jit(convnext_lib.convnext_distance)(reference.ours["convnext"], jnp.asarray(x), jnp.asarray(y))
    _report("ConvNeXt-S logits MSE", _rel(got, want), start)


def test_parity_wavelet_loss(reference):
    pytest.importorskip(
        "torch_dwt", reason="torch_dwt not installed (the reference's git dependency KeKsBoTer/torch-dwt)"
    )
    torch, start = reference.torch, time.time()
    x, y = _batch((2, 5, 3, 6, 9))  # odd frames and width: the zero padding
    # as _forward_generator calls it: (b, t, c, h, w) -> (b, c, t, h, w), then the mean
    want = reference.ae_losses.WaveletLoss3D()(
        torch.from_numpy(x).permute(0, 2, 1, 3, 4), torch.from_numpy(y).permute(0, 2, 1, 3, 4)
    ).mean()
    _report("wavelet", _rel(wavelet_loss(jnp.asarray(x), jnp.asarray(y)), want.numpy()), start)


def _generator_parity(reference, shape):
    torch, start = reference.torch, time.time()
    x, y = _batch(shape, seed=1)
    want, want_terms = reference.module(torch.from_numpy(x), torch.from_numpy(y), {}, 0, mode="generator")

    @nnx.jit
    def ours(nets, x, y):
        return losses.generator_loss(x, y, **nets, step=0)

    got, terms = ours(reference.ours, jnp.asarray(x), jnp.asarray(y))
    for name in ("reconstruction_loss", "perceptual_loss", "weighted_gan_loss", "wavelet_loss"):
        w = want_terms[name]
        w = w.numpy() if hasattr(w, "numpy") else w
        if np.abs(w) > 0:
            _report(f"generator {name} {shape}", _rel(terms[name], w), start)
        else:
            assert float(terms[name]) == 0.0
    _report(f"generator total {shape}", _rel(got, want.detach().numpy()), start)


def test_parity_generator_loss_images(reference):
    # the reference's generator step fails on images: its wavelet term is then the int 0, and
    # `(self.wavelet_loss_weight * wavelet_loss).detach()` (a float) raises AttributeError when
    # it logs the terms. A 0-d tensor weight of the same value gets it past that line.
    module, torch = reference.module, reference.torch
    weight = module.wavelet_loss_weight
    module.wavelet_loss_weight = torch.tensor(weight)
    try:
        _generator_parity(reference, (2, 3, 32, 32))
    finally:
        module.wavelet_loss_weight = weight


def test_reference_generator_step_fails_on_images(reference):
    """The reference bug the test above works around: if this starts passing, the reference
    was fixed and the workaround can go."""
    torch = reference.torch
    x, y = _batch((2, 3, 32, 32))
    with pytest.raises(AttributeError, match="detach"):
        reference.module(torch.from_numpy(x), torch.from_numpy(y), {}, 0, mode="generator")


def test_parity_generator_loss_video(reference):
    pytest.importorskip(
        "torch_dwt", reason="torch_dwt not installed (the reference's git dependency KeKsBoTer/torch-dwt)"
    )
    _generator_parity(reference, (1, 3, 3, 32, 32))  # 3 frames: the wavelet's odd-length padding


def test_parity_discriminator_loss_with_lecam_ema(reference):
    torch, start = reference.torch, time.time()
    module = reference.module
    module.ema_real_logits_mean.zero_()
    module.ema_fake_logits_mean.zero_()
    state = losses.init_lecam_state()
    step = nnx.jit(lambda d, x, y, s: losses.discriminator_loss(x, y, discriminator=d, lecam_state=s, step=0))
    for seed in (2, 3):  # the second step starts from non-zero EMAs
        x, y = _batch((2, 3, 32, 32), seed=seed)
        want, want_terms = module(torch.from_numpy(x), torch.from_numpy(y), {}, 0, mode="discriminator")
        got, terms, state = step(reference.ours["discriminator"], jnp.asarray(x), jnp.asarray(y), state)
        _report(f"discriminator loss (step {seed - 1})", _rel(got, want.detach().numpy()), start)
        _report(f"LeCam term (step {seed - 1})", _rel(terms["lecam_loss"], want_terms["lecam_loss"].numpy()), start)
        _report(
            f"LeCam EMA real (step {seed - 1})",
            _rel(state.ema_real_logits_mean, module.ema_real_logits_mean.numpy()),
            start,
        )


def test_parity_generator_gradient(reference):
    """The decoder is trained through this loss: its gradient with respect to the
    reconstructions, against torch's autograd through the reference's module."""
    module, torch, start = reference.module, reference.torch, time.time()
    x, y = _batch((2, 3, 32, 32), seed=4)
    weight = module.wavelet_loss_weight
    module.wavelet_loss_weight = torch.tensor(weight)  # past the image crash (see above)
    try:
        recon = torch.from_numpy(y).requires_grad_(True)
        module(torch.from_numpy(x), recon, {}, 0, mode="generator")[0].backward()
    finally:
        module.wavelet_loss_weight = weight
    grad = nnx.jit(lambda nets, x, y: jax.grad(lambda y: losses.generator_loss(x, y, **nets, step=0)[0])(y))(
        reference.ours, jnp.asarray(x), jnp.asarray(y)
    )
    _report("generator gradient w.r.t. the reconstructions", _rel(grad, recon.grad.numpy()), start)
