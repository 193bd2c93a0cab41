"""``model.rope_wrap``: spatial RoPE on a torus, so a wrap-around shift of the token grid is
one relative rotation for every token (moving digits roll with wrap-around)."""

import jax
import numpy as np
import pytest
from flax import nnx

from starflow_jax.config.model_config import ConfigError, ModelConfig
from starflow_jax.config.reference_args import to_model_kwargs, to_yaml_arguments, without_ours_only
from starflow_jax.layers.rope import rope_table
from starflow_jax.model.starflow import StarFlow


def _angles(cos, sin):
    return np.arctan2(sin, cos)[:, ::2]  # one angle per rotated pair


def _shift_residual(wrap: bool, shift=(1, 3), side=4, frames=3) -> float:
    """Largest spread over tokens of the angle between a slot and the slot its token moves to
    under a wrap-around shift of the grid (0 when the shift is one rotation for all)."""
    cos, sin = rope_table(32, 1, side, side, 0, None, frames, "3d", wrap)
    ang = _angles(cos, sin)  # (frames * side * side, 16)
    idx = np.arange(frames * side * side).reshape(frames, side, side)
    moved = np.roll(idx, shift, axis=(1, 2))
    diff = ang[moved.reshape(-1)] - ang[idx.reshape(-1)]
    diff = np.angle(np.exp(1j * diff))  # mod 2 pi, in (-pi, pi]
    spread = np.angle(np.exp(1j * (diff - diff[:1])))
    return float(np.abs(spread).max())


def test_a_wrap_around_shift_is_one_rotation_for_every_token():
    assert _shift_residual(wrap=True) < 1e-5
    # the reference's positions (scaled by pt_seq_len) do not have it: tokens that wrap differ
    assert _shift_residual(wrap=False) > 0.1


def test_time_and_text_slots_are_unchanged_by_wrap():
    cos_w, sin_w = rope_table(32, 1, 4, 4, 1, None, 2, "3d", True)
    cos, sin = rope_table(32, 1, 4, 4, 1, None, 2, "3d", False)
    # the last 8 pairs are the time / text axis: the same in both
    np.testing.assert_array_equal(cos_w[:, 16:], cos[:, 16:])
    np.testing.assert_array_equal(sin_w[:, 16:], sin[:, 16:])
    # the text slot (position 0 on both spatial axes) is unrotated spatially in both
    np.testing.assert_array_equal(cos_w[0, :16], np.ones(16, np.float32))


def _cfg(**kw):
    base = dict(
        in_channels=1,
        img_size=8,
        patch_size=2,
        channels=32,
        num_blocks=2,
        layers_per_block=(1, 1),
        head_dim=32,
        rope=True,
        sos=True,
        txt_size=1,
        txt_dim=3,
        cond_top_only=True,
        seq_order="L2R",
        temporal_causal=1,
        shallow_block_local=True,
    )
    base.update(kw)
    return ModelConfig(**base)


def test_a_wrapped_model_runs_and_differs_from_the_unwrapped_one():
    x = jax.random.normal(jax.random.key(0), (2, 3, 1, 8, 8))
    y = jax.nn.one_hot(np.array([[0], [1]]), 3)
    outs = []
    for wrap in (False, True):
        model = StarFlow(_cfg(rope_wrap=wrap), rngs=nnx.Rngs(0))
        # make the (zero-initialised) output projections act, so positions matter
        for block in model.blocks:
            block.proj_out.kernel.value = 0.1 * jax.random.normal(jax.random.key(1), block.proj_out.kernel.value.shape)
        outs.append(np.asarray(model(x, y).z))
    assert np.all(np.isfinite(outs[1]))
    assert np.abs(outs[0] - outs[1]).max() > 1e-4


def test_bad_rope_wrap_settings_are_named():
    with pytest.raises(ConfigError, match="rope_wrap needs rope=True"):
        _cfg(rope=False, rope_wrap=True, txt_size=1)
    with pytest.raises(ConfigError, match="pt_seq_len=16 has no meaning"):
        _cfg(rope_wrap=True, pt_seq_len=16)
    cfg = _cfg(rope_wrap=True)
    for export in (to_model_kwargs, to_yaml_arguments):
        with pytest.raises(ConfigError, match="no counterpart in the reference"):
            export(cfg)


def test_the_references_nearest_model_has_the_same_parameters():
    """``bench train --quality`` trains the reference's nearest model of a recipe with our
    position options: the options off, every parameter the same."""
    cfg = _cfg(rope_wrap=True, rope_content_keys=True)
    near, on = without_ours_only(cfg)
    assert on == ["rope_wrap", "rope_content_keys"] and not near.rope_wrap and not near.rope_content_keys
    assert to_model_kwargs(near)["channels"] == cfg.channels  # expressible now
    shapes = [jax.tree.map(lambda a: a.shape, nnx.state(StarFlow(c, rngs=nnx.Rngs(0)), nnx.Param)) for c in (cfg, near)]
    assert shapes[0] == shapes[1]
    assert without_ours_only(near) == (near, [])


@pytest.mark.parametrize("jacobi", [False, True], ids=["sequential", "jacobi"])
def test_content_keys_and_wrap_sample_back_to_the_noise(jacobi):
    """Sampling (KV cache, Jacobi chunks, a sliding window over a longer video) inverts the
    training-time forward pass of a model with both options."""
    from test_video_sampling import VIDEO, make, normal, rel

    from starflow_jax.sampling import SamplingOptions, sample

    model = make(3, rope_wrap=True, rope_content_keys=True)
    assert model.cfg.rope_content_keys and model.cfg.rope_wrap
    b, t = 2, 3
    noise = normal((b, t, 2, 2, 2), 4)
    y = normal((b, 3, 5), 5)
    opts = SamplingOptions(guidance=0.0, jacobi=jacobi, jacobi_block_size=2, jacobi_th=1e-10, jacobi_max_iter=64)
    x = sample(model, noise, y, opts)
    assert rel(model(x, y).z, noise) < 1e-4
    # the keys' positions matter: the same weights without the option map x elsewhere
    plain = make(3, rope_wrap=True)
    assert rel(plain(x, y).z, noise) > 1e-2
    assert VIDEO["local_attn_window"] == 3  # a longer video slides the window: still exact at frame 4..6
    long_noise = normal((b, 6, 2, 2, 2), 6)
    x_long = sample(model, long_noise, y, opts)
    assert rel(x_long[:, :3], sample(model, long_noise[:, :3], y, opts)) < 1e-4


def test_content_keys_need_the_start_token():
    with pytest.raises(ConfigError, match="rope_content_keys needs sos=True"):
        _cfg(rope_content_keys=True, sos=False)
    with pytest.raises(ConfigError, match="keys at their token's position"):
        to_model_kwargs(_cfg(rope_content_keys=True))
