"""The adaptive Jacobi policy (a window that advances past the tokens that stopped
changing): at threshold 0 it is sequential decoding (to float32 round-off) for image and
video models, with guidance, given frames and a sliding attention window; it never makes
more passes than sequential decoding; bad settings are named."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_video_sampling import make, normal, rel

from starflow_jax.sampling import SamplingOptions, invert, sample

# frames of test_video_sampling's model made an image model: 4x4 tokens, two blocks
IMAGE = dict(
    img_size=4,
    num_blocks=2,
    layers_per_block=(1, 2),
    temporal_causal=0,
    shallow_block_local=False,
    local_attn_window=None,
)


def _adaptive(window: int, th: float = 0.0, init: str = "noise", **kw) -> SamplingOptions:
    return SamplingOptions(
        jacobi=True, jacobi_policy="adaptive", jacobi_block_size=window, jacobi_th=th, jacobi_init=init, **kw
    )


def _image_model():
    return make(0, **IMAGE)


@pytest.mark.parametrize("init", ["noise", "zeros"])
@pytest.mark.parametrize("guidance", [0.0, 2.0], ids=["noguide", "cfg"])
def test_image_adaptive_at_threshold_zero_is_sequential(guidance, init):
    model = _image_model()
    b = 3
    noise, y = normal((b, 2, 4, 4), 1), normal((b, 3, 5), 2)
    y_in = jnp.concatenate([y, jnp.zeros_like(y)]) if guidance else y
    seq, p_seq = sample(model, noise, y_in, SamplingOptions(guidance=guidance), return_passes=True)
    ada, p_ada = sample(model, noise, y_in, _adaptive(6, init=init, guidance=guidance), return_passes=True)
    assert rel(ada, seq) < 1e-5
    assert p_seq == [16, 16] and all(a <= s for a, s in zip(p_ada, p_seq)), p_ada


def test_adaptive_with_a_threshold_saves_passes_and_stays_close():
    model = _image_model()
    noise, y = normal((2, 2, 4, 4), 3), normal((2, 3, 5), 4)
    seq = sample(model, noise, y, SamplingOptions())
    ada, passes = sample(model, noise, y, _adaptive(16, th=1e-4), return_passes=True)
    assert sum(passes) < 32 and rel(ada, seq) < 1e-2, (passes, rel(ada, seq))


@pytest.mark.parametrize("guidance", [0.0, 1.5], ids=["noguide", "cfg"])
def test_video_adaptive_at_threshold_zero_is_sequential_with_given_frames_and_a_window(guidance):
    model = make(3)
    b, t = 2, 6  # 6 frames of 4 tokens through a 3-frame window
    noise, y = normal((b, t, 2, 2, 2), 4), normal((b, 3, 5), 5)
    y_in = jnp.concatenate([y, jnp.zeros_like(y)]) if guidance else y
    first = normal((b, 1, 2, 2, 2), 6)
    seq, p_seq = sample(model, noise, y_in, SamplingOptions(guidance=guidance), given=first, return_passes=True)
    ada, p_ada = sample(model, noise, y_in, _adaptive(5, guidance=guidance), given=first, return_passes=True)
    np.testing.assert_array_equal(np.asarray(ada[:, :1]), np.asarray(first))
    assert rel(ada, seq) < 1e-5
    assert all(a <= s for a, s in zip(p_ada, p_seq)), (p_ada, p_seq)


def test_deep_block_passes_never_exceed_its_tokens():
    """Even where nothing converges early (a window of the whole sequence), every pass fixes
    at least one token."""
    model = make(5)
    z = normal((1, 4, 2, 2, 2), 6)
    y = normal((1, 3, 5), 7)
    x_seq, p_seq = invert.sequential(model.blocks[-1], z, y)
    x_ada, p_ada = invert.jacobi(model.blocks[-1], z, y, block_size=16, threshold=0.0, policy="adaptive")
    assert int(p_ada) <= int(p_seq) == 16 and rel(x_ada, x_seq) < 1e-5


def test_bad_policy_settings_are_named():
    model = _image_model()
    noise, y = normal((1, 2, 4, 4), 1), normal((1, 3, 5), 2)
    with pytest.raises(ValueError, match="block policy must be one of sequential, blockwise, adaptive, got 'greedy'"):
        sample(model, noise, y, SamplingOptions(jacobi=True, jacobi_policy="greedy"))
    with pytest.raises(ValueError, match="init must be one of noise, zeros, previous"):
        sample(model, noise, y, _adaptive(4, init="last"))
    with pytest.raises(ValueError, match="block policy window must be >= 1, got 0"):
        sample(model, noise, y, _adaptive(0))
