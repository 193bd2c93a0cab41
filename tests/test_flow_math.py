"""Pure flow math: the affine step and its log-determinant, scales, soft clipping,
the right shift, reading orders, the loss and bits per dimension."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow_jax.flow import (
    FLIP,
    IDENTITY,
    INV_SOFTPLUS_1,
    affine_forward,
    affine_inverse,
    bits_per_dim,
    block_orders,
    nll_loss,
    nll_per_example,
    permute,
    scale_from_raw,
    shift_right,
    soft_clip,
    split_raw,
)
from starflow_jax.flow.permutation import token_index


def _random(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ------------------------------------------------------------------ affine step
@pytest.mark.parametrize("use_softplus", [True, False])
def test_affine_forward_and_inverse_are_inverses(use_softplus):
    shape = (3, 7, 5)
    x, a, b = _random(shape, 0), _random(shape, 1), _random(shape, 2)
    scale = scale_from_raw(a, use_softplus)
    assert scale.dtype == jnp.float32 and bool(jnp.all(scale > 0))
    z, logdet = affine_forward(x, scale, b)
    assert z.dtype == jnp.float32 and z.shape == shape and logdet.shape == shape
    np.testing.assert_allclose(np.asarray(z), (np.asarray(x) - np.asarray(b)) / np.asarray(scale), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(affine_inverse(z, scale, b), x, rtol=1e-5, atol=1e-5)
    # and the other way round: noise -> data -> noise
    x2 = affine_inverse(x, scale, b)
    np.testing.assert_allclose(affine_forward(x2, scale, b)[0], x, rtol=1e-5, atol=1e-5)
    # z is not x: the step does something
    assert float(jnp.max(jnp.abs(z - x))) > 0.1


def test_logdet_is_minus_log_scale():
    shape = (2, 4, 3)
    scale = jnp.exp(_random(shape, 3))
    _, logdet = affine_forward(_random(shape, 4), scale, _random(shape, 5))
    np.testing.assert_allclose(logdet, -np.log(np.asarray(scale, np.float64)), rtol=1e-6, atol=1e-6)
    # elementwise: it is the log|d z_i / d x_i| of the map
    x0 = _random((6,), 6)
    s, sh = jnp.exp(_random((6,), 7)), _random((6,), 8)
    jac = jax.jacfwd(lambda v: affine_forward(v, s, sh)[0])(x0)
    np.testing.assert_allclose(np.diag(jac), np.exp(affine_forward(x0, s, sh)[1]), rtol=1e-6)
    np.testing.assert_allclose(jac - np.diag(np.diag(jac)), 0.0)


def test_scale_from_raw():
    zero = jnp.zeros((4, 3))
    # a zero raw output is exactly the unit scale, for both parametrisations
    assert np.array_equal(np.asarray(scale_from_raw(zero, use_softplus=False)), np.ones((4, 3), np.float32))
    np.testing.assert_allclose(scale_from_raw(zero, use_softplus=True), np.ones((4, 3)), rtol=1e-6, atol=0)
    assert abs(math.log(math.e - 1) - INV_SOFTPLUS_1) < 1e-12
    a = jnp.array([-3.0, -0.5, 0.7, 2.0])
    np.testing.assert_allclose(scale_from_raw(a, False), np.exp(np.asarray(a)), rtol=1e-6)
    np.testing.assert_allclose(scale_from_raw(a, True), np.log1p(np.exp(np.asarray(a) + INV_SOFTPLUS_1)), rtol=1e-6)
    # computed in float32 whatever the raw dtype
    assert scale_from_raw(a.astype(jnp.bfloat16), True).dtype == jnp.float32


def test_split_raw():
    raw = jnp.arange(12.0).reshape(1, 2, 6).astype(jnp.bfloat16)
    a, b = split_raw(raw)
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(a, [[[0, 1, 2], [6, 7, 8]]])
    np.testing.assert_array_equal(b, [[[3, 4, 5], [9, 10, 11]]])


# ------------------------------------------------------------------ soft clip
@pytest.mark.parametrize("bound", [0.5, 2.0, 4.0])
def test_soft_clip_is_bounded(bound):
    x = jnp.concatenate([jnp.linspace(-1e4, 1e4, 101), 10 * _random((200,), 9)])
    out = soft_clip(x, bound)
    assert float(jnp.max(jnp.abs(out))) <= bound
    # strictly inside the bound where tanh does not saturate in float32
    moderate = jnp.abs(x) < 2 * bound
    assert bool(jnp.all(jnp.abs(out[moderate]) < bound))
    np.testing.assert_allclose(out, bound * np.tanh(np.asarray(x) / bound), rtol=1e-6, atol=1e-6)
    # monotone (up to float32 tanh rounding near saturation), odd, and close to the identity near zero
    xs = jnp.sort(x)
    assert bool(jnp.all(jnp.diff(soft_clip(xs, bound)) >= -1e-6 * bound))
    np.testing.assert_allclose(soft_clip(-x, bound), -out, rtol=1e-6)
    np.testing.assert_allclose(soft_clip(jnp.array([1e-3 * bound]), bound), [1e-3 * bound], rtol=1e-5)


@pytest.mark.parametrize("bound", [0, 0.0, None])
def test_soft_clip_zero_bound_is_identity(bound):
    x = 100.0 * _random((3, 4), 10)
    assert np.array_equal(np.asarray(soft_clip(x, bound)), np.asarray(x))


# ------------------------------------------------------------------ shift right
def test_shift_right():
    h = jnp.arange(1.0, 13.0).reshape(2, 3, 2)
    out = shift_right(h)
    assert out.shape == h.shape
    expected = np.array([[[0, 0], [1, 2], [3, 4]], [[0, 0], [7, 8], [9, 10]]], np.float32)
    np.testing.assert_array_equal(out, expected)
    # a zero raw output for the first token means unit scale and zero shift
    a, b = split_raw(shift_right(_random((1, 4, 6), 11)))
    np.testing.assert_array_equal(scale_from_raw(a, False)[:, 0], np.ones((1, 3)))
    np.testing.assert_array_equal(b[:, 0], np.zeros((1, 3)))


# ------------------------------------------------------------------ permutations
@pytest.mark.parametrize("frames", [1, 2, 3])
@pytest.mark.parametrize("order", [IDENTITY, FLIP])
def test_permute_is_an_involution(order, frames):
    seq = _random((2, 12, 3), 12)
    once = permute(seq, order, frames)
    np.testing.assert_array_equal(permute(once, order, frames), seq)
    if order == IDENTITY:
        np.testing.assert_array_equal(once, seq)
    else:
        assert not np.array_equal(np.asarray(once), np.asarray(seq))
    # token_index describes the same permutation
    np.testing.assert_array_equal(once, seq[:, token_index(12, order, frames)])


def test_flip_is_within_each_frame():
    seq = jnp.arange(12.0).reshape(1, 12, 1)
    np.testing.assert_array_equal(permute(seq, FLIP, 1)[0, :, 0], np.arange(12)[::-1])
    np.testing.assert_array_equal(permute(seq, FLIP, 3)[0, :, 0], [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8])
    np.testing.assert_array_equal(permute(seq, FLIP, 2)[0, :, 0], [5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6])
    # channels travel with their token
    seq2 = jnp.arange(24.0).reshape(1, 6, 4)
    np.testing.assert_array_equal(permute(seq2, FLIP, 2)[0], np.asarray(seq2[0])[[2, 1, 0, 5, 4, 3]])
    with pytest.raises(ValueError, match="unknown order"):
        permute(seq, "zigzag", 1)


def test_block_orders():
    assert block_orders(4, "R2L") == ["identity", "flip", "identity", "flip"]
    assert block_orders(6, "R2L") == ["identity", "flip"] * 3
    assert block_orders(4, "L2R") == ["flip", "identity", "flip", "identity"]
    assert block_orders(6, "L2R") == ["flip", "identity"] * 3
    for n in (1, 3, 4, 5, 6):
        assert block_orders(n, "R2L") == [["identity", "flip"][i % 2] for i in range(n)]
        assert block_orders(n, "L2R") == [["identity", "flip"][(i + 1) % 2] for i in range(n)]
    with pytest.raises(ValueError, match="seq_order"):
        block_orders(4, "T2B")


# ------------------------------------------------------------------ loss
def test_nll_loss_on_a_hand_computed_example():
    z = jnp.array([[[1.0, 3.0]], [[0.0, 2.0]]])  # (b=2, n=1, c=2)
    ld_a = jnp.array([[[0.5, 0.5]], [[1.0, 0.0]]])  # mean per example: 0.5, 0.5
    ld_b = jnp.array([[[-1.0, 0.0]], [[2.0, 2.0]]])  # mean per example: -0.5, 2.0
    # example 0: 0.5 * (1 + 9) / 2 - 0.5 + 0.5 = 2.5 ; example 1: 0.5 * 4 / 2 - 0.5 - 2.0 = -1.5
    np.testing.assert_allclose(nll_per_example(z, [ld_a, ld_b]), [2.5, -1.5], rtol=1e-6)
    np.testing.assert_allclose(nll_loss(z, [ld_a, ld_b]), 0.5, rtol=1e-6)
    # a per-example (b,) log-determinant (an identity block's zeros) counts as is
    np.testing.assert_allclose(nll_loss(z, [ld_a, jnp.zeros((2,))]), (2.0 + 0.5) / 2, rtol=1e-6)
    # weights scale each example before the batch mean
    np.testing.assert_allclose(nll_loss(z, [ld_a, ld_b], weights=jnp.array([1.0, 0.0])), 1.25, rtol=1e-6)
    # no log-determinants: half the mean square
    np.testing.assert_allclose(nll_loss(z, []), (2.5 + 1.0) / 2, rtol=1e-6)


def test_nll_loss_is_the_gaussian_nll_minus_constant():
    z = _random((3, 4, 5), 13)
    lds = [0.1 * _random((3, 4, 5), 14), 0.1 * _random((3, 4, 5), 15)]
    zz, l1, l2 = (np.asarray(a, np.float64) for a in (z, *lds))
    expected = np.mean(0.5 * np.mean(zz.reshape(3, -1) ** 2, 1) - l1.reshape(3, -1).mean(1) - l2.reshape(3, -1).mean(1))
    np.testing.assert_allclose(float(nll_loss(z, lds)), expected, rtol=1e-5)


@pytest.mark.parametrize("loss_value,data_scale", [(0.0, 1.0), (1.25, 1.0), (-0.3, 127.5), (2.0, 0.5)])
def test_bits_per_dim(loss_value, data_scale):
    expected = (loss_value + 0.5 * math.log(2 * math.pi) + math.log(data_scale)) / math.log(2)
    np.testing.assert_allclose(float(bits_per_dim(loss_value, data_scale)), expected, rtol=1e-6)
    np.testing.assert_allclose(
        float(bits_per_dim(jnp.asarray(loss_value))),
        (loss_value + 0.5 * math.log(2 * math.pi)) / math.log(2),
        rtol=1e-6,
    )


def test_bits_per_dim_of_a_standard_normal():
    # the entropy of N(0, 1) in nats is 0.5 log(2 pi e); the loss of z ~ N(0, 1) is E[0.5 z^2] = 0.5
    np.testing.assert_allclose(float(bits_per_dim(0.5)), 0.5 * math.log2(2 * math.pi * math.e), rtol=1e-6)
