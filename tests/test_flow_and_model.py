"""Flow math (pure functions) and model properties: exact log-determinant, causality,
stacked layers, identity blocks, bf16 compute."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starflow_jax.config import ModelConfig
from starflow_jax.flow import affine, loss, permutation
from starflow_jax.model import StarFlow


def test_affine_step_inverts_and_logdet():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (2, 5, 3))
    scale = affine.scale_from_raw(jax.random.normal(k2, (2, 5, 3)), use_softplus=True)
    shift = jax.random.normal(k3, (2, 5, 3))
    z, ld = affine.affine_forward(x, scale, shift)
    np.testing.assert_allclose(affine.affine_inverse(z, scale, shift), x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ld, -jnp.log(scale), rtol=1e-6)
    for sp in (True, False):
        np.testing.assert_allclose(affine.scale_from_raw(jnp.zeros(3), sp), jnp.ones(3), rtol=1e-7)


def test_soft_clip_and_shift():
    x = jnp.linspace(-50, 50, 11)
    assert float(jnp.max(jnp.abs(affine.soft_clip(x, 4.0)))) <= 4.0
    np.testing.assert_allclose(affine.soft_clip(jnp.array([0.1]), 4.0), [4.0 * math.tanh(0.025)], rtol=1e-6)
    np.testing.assert_array_equal(affine.soft_clip(x, 0.0), x)
    h = jnp.arange(6.0).reshape(1, 3, 2)
    np.testing.assert_array_equal(affine.shift_right(h), jnp.array([[[0, 0], [0, 1], [2, 3]]], jnp.float32))


def test_permutations():
    seq = jnp.arange(12.0).reshape(1, 12, 1)
    np.testing.assert_array_equal(permutation.permute(seq, "flip", 1)[0, :, 0], np.arange(12)[::-1])
    # three frames of four tokens: flipped within each frame, frames stay in order
    within = permutation.permute(seq, "flip", 3)[0, :, 0]
    np.testing.assert_array_equal(within, [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8])
    for order in ("identity", "flip"):
        for frames in (1, 3):
            np.testing.assert_array_equal(permutation.permute(permutation.permute(seq, order, frames), order, frames), seq)
    assert permutation.block_orders(4, "R2L") == ["identity", "flip", "identity", "flip"]
    assert permutation.block_orders(6, "L2R") == ["flip", "identity"] * 3


def test_loss_and_bits_per_dim():
    z = jnp.array([[1.0, 3.0], [0.0, 2.0]])
    lds = [jnp.array([[0.5, 0.5], [1.0, 0.0]]), jnp.zeros((2,))]
    # per example: 0.5*mean(z^2) - mean(logdet): [2.5 - 0.5, 1.0 - 0.5]
    np.testing.assert_allclose(loss.nll_per_example(z, lds), [2.0, 0.5])
    np.testing.assert_allclose(loss.nll_loss(z, lds), 1.25)
    np.testing.assert_allclose(loss.bits_per_dim(1.25, 127.5),
                               (1.25 + 0.5 * math.log(2 * math.pi) + math.log(127.5)) / math.log(2), rtol=1e-6)


def _randomised(cfg, seed=0, std=0.3):
    """A model whose every parameter is random (zero-initialised outputs make the flow trivial)."""
    model = StarFlow(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [l + std * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


IMG = dict(in_channels=2, img_size=2, patch_size=1, channels=32, num_blocks=3, layers_per_block=(1, 1, 1),
           head_dim=16, rope=True, sos=True, use_softplus=True, soft_clip=2.0)


def test_log_determinant_is_exact():
    cfg = ModelConfig(**IMG)
    model = _randomised(cfg)
    x = jax.random.normal(jax.random.key(3), (1, 2, 2, 2))
    out = model(x)
    ours = sum(float(jnp.sum(ld)) for ld in out.logdets)
    graphdef, state = nnx.split(model)

    def flow(v):  # a pure function of the input (the model rebuilt inside the transform)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a, state))(v.reshape(x.shape)).z.reshape(-1)

    jac = jax.jacfwd(flow)(x.reshape(-1))
    _, logabsdet = jnp.linalg.slogdet(jac)
    assert abs(ours - float(logabsdet)) < 1e-4 * max(1.0, abs(ours))


def test_block_is_causal_in_its_reading_order():
    cfg = ModelConfig(**{**IMG, "img_size": 4, "num_blocks": 2, "layers_per_block": (1, 1)})
    model = _randomised(cfg)
    block = model.blocks[0]
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 2))
    z0, _ = block(x)
    seq0, _ = block.tokens(z0)
    t = 9
    xs, frames = block.tokens(x)
    x2 = block.untokens(xs.at[:, t].add(1.0), x.shape, frames)
    seq1, _ = block.tokens(block(x2)[0])
    np.testing.assert_allclose(seq0[:, :t], seq1[:, :t], atol=1e-6)
    assert float(jnp.max(jnp.abs(seq0[:, t + 1:] - seq1[:, t + 1:]))) > 1e-4


def test_video_model_is_causal_in_time():
    cfg = ModelConfig(in_channels=2, img_size=2, patch_size=1, channels=32, num_blocks=3, layers_per_block=(1, 1, 1),
                      head_dim=32, rope=True, sos=True, txt_size=2, txt_dim=3, cond_top_only=True,
                      use_softplus=True, soft_clip=2.0, temporal_causal=1, shallow_block_local=True,
                      seq_order="L2R")
    model = _randomised(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 3, 2, 2, 2))
    y = jax.random.normal(jax.random.key(1), (2, 2, 3))
    z = model(x, y).z
    assert z.shape == x.shape
    z2 = model(x.at[:, 2].add(1.0), y).z
    np.testing.assert_allclose(z[:, :2], z2[:, :2], atol=1e-6)
    assert float(jnp.max(jnp.abs(z[:, 2] - z2[:, 2]))) > 1e-4


def test_stacked_layers_identity_blocks_and_bf16():
    cfg = ModelConfig(**{**IMG, "num_blocks": 3, "layers_per_block": (2, 0, 3)})
    model = _randomised(cfg)
    for block, n in ((model.blocks[0], 2), (model.blocks[2], 3)):
        for leaf in jax.tree.leaves(nnx.state(block.attn_blocks, nnx.Param)):
            assert leaf.shape[0] == n
    assert jax.tree.leaves(nnx.state(model.blocks[1], nnx.Param)) == []
    x = jax.random.normal(jax.random.key(0), (2, 2, 2, 2))
    out = model(x)
    np.testing.assert_array_equal(out.logdets[1], jnp.zeros(2))
    np.testing.assert_array_equal(out.outputs[2], out.outputs[1])
    bf = nnx.merge(nnx.graphdef(StarFlow(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))),
                   nnx.state(model))
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(nnx.state(bf, nnx.Param)))
    l32 = float(loss.nll_loss(out.z, out.logdets))
    o16 = bf(x)
    l16 = float(loss.nll_loss(o16.z, o16.logdets))
    assert np.isfinite(l16) and abs(l16 - l32) <= 5e-2 * max(1.0, abs(l32))
    assert o16.z.dtype == jnp.float32
