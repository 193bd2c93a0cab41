"""Video workflows of the sampler: videos longer than the attention window (sliding
window with context re-encoding), image-to-video / video-to-video (a given prefix kept
exactly), chunk-wise denoising; and, with a checkout of apple/ml-starflow in
``$STARFLOW_REFERENCE_REPO``, the same samples from the reference on the same weights."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starflow_jax.config import ModelConfig
from starflow_jax.model import StarFlow
from starflow_jax.model.patchify import patchify
from starflow_jax.sampling import SamplingOptions, invert, sample
from starflow_jax.sampling.denoise import denoise, denoise_video
from starflow_jax.sampling.invert import window_plan

# frames of 2x2 tokens (frame = 4 tokens), a 3-frame attention window
VIDEO = dict(
    in_channels=2,
    img_size=2,
    patch_size=1,
    channels=32,
    num_blocks=3,
    layers_per_block=(1, 1, 2),
    head_dim=32,
    rope=True,
    sos=True,
    txt_size=3,
    txt_dim=5,
    cond_top_only=True,
    use_softplus=True,
    use_final_norm=True,
    soft_clip=2.0,
    temporal_causal=1,
    shallow_block_local=True,
    seq_order="L2R",
    local_attn_window=3,
)


def make(seed: int = 0, **over) -> StarFlow:
    """A random model whose blocks are far from the identity (proj_out is zero at init)."""
    model = StarFlow(ModelConfig(**{**VIDEO, **over}), rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda a: a + 0.15 * jax.random.normal(next(keys), a.shape, a.dtype), state)
    return nnx.merge(graphdef, state)


def normal(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def test_window_plan():
    # 7 frames of 4 tokens, window 3 frames, context 2 frames: one new frame per window
    assert window_plan(28, 4, 0, 3, 2) == [(0, 0, 12), (4, 12, 16), (8, 16, 20), (12, 20, 24), (16, 24, 28)]
    # context 1: two new frames per window, the last one cut at the end
    assert window_plan(28, 4, 0, 3, 1) == [(0, 0, 12), (8, 12, 20), (16, 20, 28)]
    assert window_plan(20, 4, 4, 3, 1) == [(0, 4, 12), (8, 12, 20)]
    assert window_plan(28, 4, 8, None, None) == [(0, 8, 28)]
    with pytest.raises(ValueError, match="context"):
        window_plan(28, 4, 0, 3, 3)
    with pytest.raises(ValueError, match="exceed the attention window"):
        window_plan(28, 4, 16, 3, 2)


@pytest.mark.parametrize("jacobi", [False, True], ids=["sequential", "jacobi"])
def test_long_video_first_window_equals_ordinary_sampling(jacobi):
    model = make(1)
    b, t, w = 2, 7, 3
    noise = normal((b, t, 2, 2, 2), 2)
    y = normal((b, 3, 5), 3)
    opts = SamplingOptions(jacobi=jacobi, jacobi_block_size=2, jacobi_th=1e-9, jacobi_max_iter=64)
    long, passes = sample(model, noise, y, opts, return_passes=True)
    short = sample(model, noise[:, :w], y, opts)
    assert long.shape == noise.shape and bool(jnp.all(jnp.isfinite(long)))
    assert rel(long[:, :w], short) < 1e-5
    if not jacobi:
        # 28 tokens one by one, plus one context re-encoding per later window (4 windows)
        assert passes[0] == 28 + 4


def test_long_video_windows_are_fresh_sequences_over_their_context():
    """Every later window is the deep block inverted over ``context + new`` frames, the
    context given (positions restart at the window): checked against inverting those
    frames on their own with the context as a given prefix."""
    model = make(4)
    b, t, w, c = 1, 6, 3, 1
    noise = normal((b, t, 2, 2, 2), 5)
    y = normal((b, 3, 5), 6)
    deep = model.blocks[-1]
    z = patchify(noise, 1)
    x, passes = invert.sequential(deep, z, y, window=w, context=c)
    # windows: frames [0, 3), then [2, 5) with frame 2 as context, then [4, 6) with frame 4
    for base, end in ((2, 5), (4, 6)):
        sub, _ = invert.sequential(deep, z[:, base:end], y, x[:, base : base + c])
        assert rel(x[:, base + c : end], sub[:, c:]) < 1e-5
    xj, _ = invert.jacobi(deep, z, y, window=w, context=c, block_size=2, threshold=1e-10, max_iter=64)
    assert rel(xj, x) < 1e-4
    assert int(passes) == 24 + 2


@pytest.mark.parametrize("jacobi", [False, True], ids=["sequential", "jacobi"])
@pytest.mark.parametrize("guidance", [0.0, 1.5], ids=["noguide", "cfg"])
def test_image_to_video_keeps_the_given_frame_and_inverts_the_rest(jacobi, guidance):
    model = make(7)
    b, t = 2, 3
    noise = normal((b, t, 2, 2, 2), 8)
    y = normal((b, 3, 5), 9)
    y_in = jnp.concatenate([y, jnp.zeros_like(y)]) if guidance else y
    first = normal((b, 1, 2, 2, 2), 10)
    opts = SamplingOptions(guidance=guidance, jacobi=jacobi, jacobi_block_size=2, jacobi_th=1e-9, jacobi_max_iter=64)
    x = sample(model, noise, y_in, opts, given=first)
    np.testing.assert_array_equal(np.asarray(x[:, :1]), np.asarray(first))
    if guidance == 0:
        # the later frames are the flow's inverse of the noise, given the first frame
        z = model(x, y).z
        assert rel(z[:, 1:], noise[:, 1:]) < 1e-4
    # video-to-video: two given frames
    x2 = sample(model, noise, y_in, opts, given=x[:, :2])
    np.testing.assert_array_equal(np.asarray(x2[:, :2]), np.asarray(x[:, :2]))
    assert rel(x2, x) < 1e-4


def test_image_to_long_video():
    model = make(11)
    b, t = 1, 5
    noise = normal((b, t, 2, 2, 2), 12)
    y = normal((b, 3, 5), 13)
    first = normal((b, 1, 2, 2, 2), 14)
    x = sample(model, noise, y, SamplingOptions(), given=first)
    np.testing.assert_array_equal(np.asarray(x[:, :1]), np.asarray(first))
    short = sample(model, noise[:, :3], y, SamplingOptions(), given=first)
    assert rel(x[:, :3], short) < 1e-5


def test_given_frames_bad_input():
    model = make(0)
    noise = normal((1, 3, 2, 2, 2), 0)
    y = normal((1, 3, 5), 1)
    with pytest.raises(ValueError, match="given frames"):
        sample(model, noise, y, given=normal((1, 1, 3, 2, 2), 2))
    with pytest.raises(ValueError, match="given frames"):
        sample(model, noise, y, given=normal((1, 4, 2, 2, 2), 2))
    with pytest.raises(ValueError, match="NaN"):
        sample(model, noise, y, given=jnp.full((1, 1, 2, 2, 2), jnp.nan))
    with pytest.raises(ValueError, match="context_frames"):
        sample(model, normal((1, 5, 2, 2, 2), 0), y, SamplingOptions(context_frames=3))
    no_sos = make(0, sos=False)
    with pytest.raises(ValueError, match="SOS"):
        sample(no_sos, noise, y, given=normal((1, 1, 2, 2, 2), 2))


def test_chunked_denoising_follows_the_overlap_rule():
    model = make(3, learnable_self_denoiser=True, conditional_denoiser=True, denoiser_window=None)
    b, t, w = 1, 5, 3
    x = normal((b, t, 2, 2, 2), 4)
    y = normal((b, 3, 5), 5)
    out = denoise_video(model, x, y, noise_std=0.3, window=w)
    # the first window is denoised whole; frame k >= w by the window ending at it, whose
    # earlier frames are the already denoised ones
    np.testing.assert_allclose(
        np.asarray(out[:, :w]), np.asarray(denoise(model, x[:, :w], y, noise_std=0.3)), atol=1e-6
    )
    for k in range(w, t):
        ctx = jnp.concatenate([out[:, k - w + 1 : k], x[:, k : k + 1]], axis=1)
        np.testing.assert_allclose(
            np.asarray(out[:, k]), np.asarray(denoise(model, ctx, y, noise_std=0.3)[:, -1]), atol=1e-6
        )
    # a video within the window is denoised whole
    np.testing.assert_allclose(
        np.asarray(denoise_video(model, x[:, :w], y, noise_std=0.3, window=w)),
        np.asarray(denoise(model, x[:, :w], y, noise_std=0.3)),
        atol=1e-6,
    )


# ------------------------------------------------------------ the reference, same weights
REFERENCE_REPO = os.environ.get("STARFLOW_REFERENCE_REPO")


@pytest.mark.skipif(
    not REFERENCE_REPO,
    reason="STARFLOW_REFERENCE_REPO is unset: no apple/ml-starflow checkout "
    "to compare long-video and image-to-video sampling with",
)
def test_long_video_and_image_to_video_match_the_reference():
    import torch

    from starflow_jax.bench.reference import ensure_process_group, import_reference, reference_model

    tf = import_reference(REFERENCE_REPO)
    ensure_process_group()
    model = make(21)
    ref = reference_model(tf, model.cfg, nnx.state(model, nnx.Param))
    b, t, c = 2, 6, 2
    noise = normal((b, t, 2, 2, 2), 22)
    y = normal((b, 3, 5), 23)
    yn = jnp.zeros_like(y)
    first = normal((b, 1, 2, 2, 2), 24)
    kw = dict(jacobi=True, jacobi_block_size=2, jacobi_th=1e-9, jacobi_max_iter=64)
    T = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    errs = {}
    with torch.no_grad():
        # long video: 6 frames through a 3-frame window, context 1 frame, guidance 1
        want = ref(T(noise), torch.cat([T(y), T(yn)]), reverse=True, guidance=1.0, context_length=1, **kw).numpy()
        got = sample(
            model,
            noise,
            jnp.concatenate([y, yn]),
            SamplingOptions(
                guidance=1.0, jacobi=True, jacobi_block_size=2, jacobi_th=1e-9, jacobi_max_iter=64, context_frames=1
            ),
        )
        errs["long_video"] = rel(got, want)
        # image to video (3 frames, guidance), the reference's forward_context then sampling
        caches = ref(T(first), torch.cat([T(y), T(yn)]), context=True)
        want = ref(
            T(noise[:, :3]),
            torch.cat([T(y), T(yn)]),
            reverse=True,
            guidance=1.0,
            kv_caches=caches,
            context_length=c,
            **kw,
        ).numpy()
        got = sample(
            model,
            noise[:, :3],
            jnp.concatenate([y, yn]),
            SamplingOptions(guidance=1.0, jacobi=True, jacobi_block_size=2, jacobi_th=1e-9, jacobi_max_iter=64),
            given=first,
        )
        errs["image_to_video"] = rel(got, want)
    print("largest relative difference vs the reference:", errs)
    assert max(errs.values()) < 1e-4, errs
