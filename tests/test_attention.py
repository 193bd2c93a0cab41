"""The attention dispatcher: every implementation available here (XLA's, the blocked
online-softmax one, the Pallas TPU splash kernel in Pallas' interpreter, and "auto")
against a plain softmax(QK^T)V in float32, values and gradients, for the masks the model
uses: causal (with a text prefix), the sliding window over frames, the video denoiser's
block-causal window, none; grouped-query heads; and a whole model with blocked and with
splash attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_case

from starflow_jax.interop import reference_cases as rc
from starflow_jax.layers.attention import ATTENTION_IMPLS, dot_product_attention, resolve_attention
from starflow_jax.model.denoiser import block_causal_mask


def plain(q, k, v, scale, causal, mask):
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    ok = jnp.ones(s.shape[-2:], bool) if mask is None else mask
    if causal:
        ok = ok & jnp.tril(jnp.ones(s.shape[-2:], bool))
    s = jnp.where(ok, s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


CASES = {
    "causal": (True, None),
    "full": (False, None),
    # index rules (IndexMask): splash evaluates them in the kernel, the others materialise them
    "denoiser_window": (False, block_causal_mask(frames=3, frame_tokens=9, txt_len=5, lookahead=2, window=1)),
    "denoiser_window_numpy": (
        False,
        np.asarray(block_causal_mask(frames=3, frame_tokens=9, txt_len=5, lookahead=2, window=1)),
    ),
    "causal_and_rule": (True, block_causal_mask(frames=5, frame_tokens=6, txt_len=4, lookahead=1, window=2)),
}


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_paths_match_the_plain_computation(impl, case):
    causal, mask = CASES[case]
    n = 32 if mask is None else mask.shape[0]
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, n, 4, 16))
    k = jax.random.normal(kk, (2, n, 2, 16))  # grouped-query: 4 query heads over 2 kv heads
    v = jax.random.normal(kv, (2, n, 2, 16))
    m = mask

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    def ours(q, k, v):
        return dot_product_attention(q, k, v, scale=0.25, causal=causal, mask=m, impl=impl, block=8)

    def want(q, k, v):
        return plain(q, k, v, 0.25, causal, None if m is None else jnp.asarray(np.asarray(m)))

    np.testing.assert_allclose(np.asarray(ours(q, k, v)), np.asarray(want(q, k, v)), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    g_want = jax.grad(lambda *a: loss(want, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_auto_picks_splash_only_for_tpu():
    from starflow_jax.layers.platform import compile_target

    assert resolve_attention("auto") == {"tpu": "splash", "cpu": "per_head"}.get(jax.default_backend(), "xla")
    with compile_target("tpu"):
        assert resolve_attention("auto") == "splash"
    with compile_target("gpu"):
        assert resolve_attention("auto") == "xla"
    with compile_target("cpu"):
        assert resolve_attention("auto") == "per_head"


def test_splash_refuses_a_traced_mask():
    x = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match="known when the program is traced"):
        jax.jit(lambda x, m: dot_product_attention(x, x, x, scale=1.0, causal=True, mask=m, impl="splash"))(
            x, jnp.ones((8, 8), bool)
        )


def test_index_masks_materialise_as_the_rules_say():
    m = np.asarray(block_causal_mask(frames=3, frame_tokens=2, txt_len=1, lookahead=1, window=1))
    assert m.shape == (7, 7) and m[:, 0].all()  # every slot sees the text
    assert m[1:, 1:].tolist() == [[r // 2 - 1 <= c // 2 <= r // 2 for c in range(6)] for r in range(6)]


def test_unknown_attention_impl():
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        dot_product_attention(x, x, x, scale=1.0, causal=True, impl="flash9")


def test_model_with_blocked_attention_matches_the_reference_case():
    """A whole model (text prefix, causal blocks) with blocked attention in blocks that do
    not divide the sequence reproduces the reference's forward loss."""
    case = reference_case("t2i_small")
    model, _ = rc.build_model(case, attention_impl="blocked", attention_block=24)
    x, y = jnp.asarray(case.arrays["input/x"]), jnp.asarray(case.arrays["input/y"])
    assert model.cfg.attention_impl == "blocked"
    loss = float(model.loss(x, y))
    np.testing.assert_allclose(loss, float(case.arrays["forward/loss"]), rtol=1e-5)


def test_video_model_with_splash_attention_matches_the_reference_case():
    """A video model with the learnable denoiser (block-causal mask) through the splash
    kernel (interpreted here) reproduces the reference's forward loss and denoiser output."""
    case = reference_case("video_small")
    model, _ = rc.build_model(case, attention_impl="splash")
    x, y = jnp.asarray(case.arrays["input/x"]), jnp.asarray(case.arrays["input/y"])
    np.testing.assert_allclose(float(model.loss(x, y)), float(case.arrays["forward/loss"]), rtol=1e-5)
