"""The attention dispatcher: every implementation available here (XLA's, and the blocked
online-softmax one) against a plain softmax(QK^T)V in float32, values and gradients, for
the masks the model uses: causal (with a text prefix), the video denoiser's block-causal
window, none; grouped-query heads; and a whole model with blocked attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow_jax.interop import reference_cases as rc
from starflow_jax.layers.attention import ATTENTION_IMPLS, dot_product_attention
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
    "denoiser_window": (False, np.asarray(block_causal_mask(frames=3, frame_tokens=9, txt_len=5, lookahead=2,
                                                            window=1))),
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
    m = None if mask is None else jnp.asarray(mask)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    ours = lambda q, k, v: dot_product_attention(q, k, v, scale=0.25, causal=causal, mask=m, impl=impl, block=8)
    want = lambda q, k, v: plain(q, k, v, 0.25, causal, m)
    np.testing.assert_allclose(np.asarray(ours(q, k, v)), np.asarray(want(q, k, v)), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    g_want = jax.grad(lambda *a: loss(want, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_unknown_attention_impl():
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        dot_product_attention(x, x, x, scale=1.0, causal=True, impl="flash9")


def test_model_with_blocked_attention_matches_the_reference_case():
    """A whole model (text prefix, causal blocks) with blocked attention in blocks that do
    not divide the sequence reproduces the reference's forward loss."""
    case = [rc.load_case(p) for p in rc.discover() if p.stem == "t2i_small"][0]
    model, _ = rc.build_model(case, attention_impl="blocked", attention_block=24)
    x, y = jnp.asarray(case.arrays["input/x"]), jnp.asarray(case.arrays["input/y"])
    assert model.cfg.attention_impl == "blocked"
    loss = float(model.loss(x, y))
    np.testing.assert_allclose(loss, float(case.arrays["forward/loss"]), rtol=1e-5)
