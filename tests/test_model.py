"""Model-level properties of tiny random models: the exact log-determinant, causality of
every block in its reading order and of video models in time, bfloat16 compute, stacked
layer parameters, identity blocks and the learnable denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starflow_jax.config import ModelConfig
from starflow_jax.flow.loss import nll_loss
from starflow_jax.model import StarFlow
from starflow_jax.model.flow_block import FlowBlock, IdentityBlock
from starflow_jax.model.patchify import patchify


def make(cfg: ModelConfig, seed: int = 0, std: float = 0.2) -> StarFlow:
    """A model of ``cfg`` with every parameter random (the zero-initialised output
    projections make a freshly built model the identity flow, which would make most
    checks vacuous). Built abstractly and filled, which is much faster than a real init:
    kernels ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, std^2), everything else ~ N(0, std^2)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    keys = jax.random.split(jax.random.key(1000 + seed), len(flat))
    leaves = []
    for (path, var), key in zip(flat, keys):
        shape, dtype = var.shape, var.dtype
        noise = jax.random.normal(key, shape, jnp.float32)
        name = str(path[-1])
        if name == "kernel":
            value = noise / np.sqrt(shape[-2])
            if "proj_out" in [str(p) for p in path]:
                value = value * 2 * std
        elif name == "weight":
            value = 1.0 + std * noise
        else:
            value = std * noise
        leaves.append((path, var.replace(value.astype(dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def jitted(model, method: str = "__call__"):
    """``model.<method>`` compiled once (eager calls of the scanned layers are slow)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, *args: getattr(nnx.merge(graphdef, s), method)(*args))
    return lambda *args: fn(state, *args)


def normal(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# 8 dimensions: 2x2 grid of 2-channel tokens
TINY = dict(
    in_channels=2,
    img_size=2,
    patch_size=1,
    channels=32,
    num_blocks=3,
    layers_per_block=(1, 1, 1),
    head_dim=16,
    soft_clip=2.0,
)


# ------------------------------------------------------------------ (a) exact log-determinant
@pytest.mark.parametrize(
    "extra",
    [
        dict(rope=True, sos=True, use_softplus=True, seq_order="R2L"),
        dict(rope=False, sos=False, use_softplus=False, seq_order="L2R", layers_per_block=(2, 1, 1)),
    ],
    ids=["rope-sos-softplus-R2L", "learned-pos-shift-exp-L2R"],
)
def test_log_determinant_equals_log_abs_det_of_the_jacobian(extra):
    cfg = ModelConfig(**{**TINY, **extra})
    model = make(cfg, seed=1, std=0.3)
    x = normal((1, 2, 2, 2), 2)
    graphdef, state = nnx.split(model)

    def flow(v, s):
        s = jax.tree.map(lambda a: a, s)  # fresh Variables at jacfwd's trace level
        return nnx.merge(graphdef, s)(v.reshape(x.shape)).z.reshape(-1)

    def logdet_sum(v, s):
        return sum(jnp.sum(ld) for ld in nnx.merge(graphdef, s)(v.reshape(x.shape)).logdets)

    ours = float(jax.jit(logdet_sum)(x.reshape(-1), state))
    jac = jax.jit(jax.jacfwd(flow))(x.reshape(-1), state)
    assert jac.shape == (8, 8)
    sign, logabsdet = np.linalg.slogdet(np.asarray(jac, np.float64))
    assert sign != 0
    # the model really transforms (a vacuous identity flow would give 0 == 0)
    assert abs(float(logabsdet)) > 0.05
    assert np.abs(np.asarray(jac) - np.eye(8)).max() > 0.05
    assert abs(ours - float(logabsdet)) < 1e-4, (ours, float(logabsdet))


# ------------------------------------------------------------------ (b) causality of a block
@pytest.mark.parametrize(
    "extra",
    [
        dict(rope=True, sos=True, use_softplus=True),
        dict(rope=False, sos=False, use_softplus=False),
        dict(rope=True, sos=True, use_softplus=True, txt_size=3, txt_dim=5, head_dim=32),
    ],
    ids=["sos", "no-sos", "text"],
)
def test_block_is_causal_in_its_reading_order(extra):
    cfg = ModelConfig(**{**TINY, "img_size": 4, "num_blocks": 2, "layers_per_block": (1, 1), **extra})
    model = make(cfg, seed=3)
    x = patchify(normal((2, 2, 4, 4), 4), 1)  # (b, h, w, c)
    y = normal((2, cfg.txt_size, cfg.txt_dim), 5) if cfg.txt_dim else None
    for block_index, order in enumerate(["identity", "flip"]):
        block = model.blocks[block_index]
        assert block.order == order
        run = jitted(block)
        z0, ld0 = run(x, y)  # logdet (b, n, c) is in the block's reading order
        seq_z0, frames = block.tokens(z0)
        seq_x, _ = block.tokens(x)
        n = seq_x.shape[1]
        assert ld0.shape == seq_x.shape
        for t in (0, 5, n - 1):
            x2 = block.untokens(seq_x.at[:, t].add(1.5), x.shape, frames)
            # exactly one raster token changed
            changed = np.nonzero(np.any(np.asarray(x2 != x), axis=(0, 3)).reshape(-1))[0]
            assert len(changed) == 1
            z1, ld1 = run(x2, y)
            seq_z1, _ = block.tokens(z1)
            np.testing.assert_array_equal(np.asarray(seq_z1[:, :t]), np.asarray(seq_z0[:, :t]))
            # the affine transform of token t depends only on the tokens before it: its scale
            # (log-det) is unchanged and z_t moves by exactly delta / scale
            np.testing.assert_allclose(np.asarray(ld1[:, : t + 1]), np.asarray(ld0[:, : t + 1]), atol=1e-6, rtol=0)
            np.testing.assert_allclose(
                np.asarray(seq_z1[:, t] - seq_z0[:, t]), 1.5 * np.exp(np.asarray(ld0[:, t])), rtol=1e-4, atol=1e-5
            )
            # token t itself and (through the Transformer) the later tokens do change
            assert float(jnp.max(jnp.abs(seq_z1[:, t] - seq_z0[:, t]))) > 1e-3
            if t < n - 1:
                assert float(jnp.max(jnp.abs(seq_z1[:, t + 1 :] - seq_z0[:, t + 1 :]))) > 1e-4


# ------------------------------------------------------------------ (c) video model
VIDEO = dict(
    in_channels=2,
    img_size=2,
    patch_size=1,
    channels=32,
    num_blocks=3,
    layers_per_block=(1, 1, 1),
    head_dim=32,
    rope=True,
    sos=True,
    txt_size=3,
    txt_dim=5,
    cond_top_only=True,
    use_softplus=True,
    soft_clip=2.0,
    temporal_causal=1,
    shallow_block_local=True,
    seq_order="L2R",
)


@pytest.mark.parametrize("local", [True, False], ids=["shallow_block_local", "shallow_blocks_global"])
def test_video_model_shapes_and_causality_in_time(local):
    cfg = ModelConfig(**{**VIDEO, "shallow_block_local": local})
    run = jitted(make(cfg, seed=6))
    b, t = 2, 3
    x = normal((b, t, 2, 2, 2), 7)
    y = normal((b, 3, 5), 8)
    out = run(x, y)
    assert out.z.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(out.z)))
    assert len(out.logdets) == 3 and all(bool(jnp.all(jnp.isfinite(ld))) for ld in out.logdets)
    # changing frame 2 leaves frames 0 and 1 unchanged
    z2 = run(x.at[:, 2].add(1.0), y).z
    np.testing.assert_allclose(np.asarray(z2[:, :2]), np.asarray(out.z[:, :2]), atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(z2[:, 2] - out.z[:, 2]))) > 1e-3
    # changing frame 1 leaves frame 0 unchanged and changes the later frames (the top block reads the past)
    z1 = run(x.at[:, 1].add(1.0), y).z
    np.testing.assert_allclose(np.asarray(z1[:, 0]), np.asarray(out.z[:, 0]), atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(z1[:, 1] - out.z[:, 1]))) > 1e-3
    assert float(jnp.max(jnp.abs(z1[:, 2] - out.z[:, 2]))) > 1e-4
    # every block is causal in time: its output for frame 0 depends on frame 0 only
    h1 = run(x.at[:, 1:].add(1.0), y).outputs
    for i in (1, 2, 3):
        np.testing.assert_allclose(np.asarray(h1[i][:, 0]), np.asarray(out.outputs[i][:, 0]), atol=1e-6, rtol=0)
    # local shallow blocks see one frame: their output for frame 2 ignores frame 1; global ones read it
    h2 = run(x.at[:, 1].add(1.0), y).outputs[1]
    diff = float(jnp.max(jnp.abs(h2[:, 2] - out.outputs[1][:, 2])))
    assert diff == 0.0 if local else diff > 1e-4
    # the conditioning matters (the top block reads it)
    z_y = run(x, y + 1.0).z
    assert float(jnp.max(jnp.abs(z_y - out.z))) > 1e-4


# ------------------------------------------------------------------ (d) bfloat16 compute
@pytest.mark.parametrize("temporal_causal", [0, 1])
def test_video_flip_order_follows_temporal_causal(temporal_causal):
    """A ``flip`` block reverses each frame of a time-causal video model (frames stay in
    time order) and the whole sequence otherwise, as the reference's two permutations do."""
    cfg = ModelConfig(**{**VIDEO, "temporal_causal": temporal_causal, "shallow_block_local": False, "seq_order": "L2R"})
    block = FlowBlock(cfg, channels=32, num_heads=1, num_layers=1, order="flip", conditioned=False, rngs=nnx.Rngs(0))
    b, t, n = 1, 3, 4
    x = jnp.arange(b * t * n, dtype=jnp.float32).reshape(b, t, 2, 2, 1)
    seq, frames = block.tokens(x)
    got = np.asarray(seq[0, :, 0]).astype(int).tolist()
    want = [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8] if temporal_causal else list(range(11, -1, -1))
    assert frames == t and got == want
    assert block.keeps_frame_order(t) == bool(temporal_causal)
    np.testing.assert_array_equal(np.asarray(block.untokens(seq, x.shape, frames)), np.asarray(x))


def matmul_operand_dtypes(fn, *args) -> list[tuple[str, ...]]:
    """Operand dtypes of every ``dot_general`` in the jaxpr of ``fn(*args)`` (scan bodies included)."""
    from jax.extend import core as jcore

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if isinstance(sub, jcore.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jcore.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bfloat16_compute_keeps_float32_params_and_matches_float32():
    cfg = ModelConfig(
        **{
            **TINY,
            "img_size": 4,
            "rope": True,
            "sos": True,
            "use_softplus": True,
            "txt_size": 2,
            "txt_dim": 3,
            "head_dim": 32,
        }
    )
    model32 = make(cfg, seed=9, std=0.1)
    cfg16 = cfg.replace(dtype="bfloat16")
    abstract16 = nnx.eval_shape(lambda: StarFlow(cfg16, rngs=nnx.Rngs(0)))
    # a bfloat16-compute model stores float32 parameters
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(abstract16, nnx.Param)))
    model16 = nnx.merge(nnx.graphdef(abstract16), nnx.state(model32))
    params = jax.tree.leaves(nnx.state(model16, nnx.Param))
    assert params and all(leaf.dtype == jnp.float32 for leaf in params)
    x = normal((2, 2, 4, 4), 10)
    y = normal((2, 2, 3), 11)
    out32, out16 = jitted(model32)(x, y), jitted(model16)(x, y)
    l32 = float(nll_loss(out32.z, out32.logdets))
    l16 = float(nll_loss(out16.z, out16.logdets))
    assert np.isfinite(l16) and np.isfinite(l32)
    assert abs(l32) > 0.1
    assert abs(l16 - l32) <= 5e-2 * abs(l32), (l16, l32)
    # the affine step and log-determinants stay float32
    assert out16.z.dtype == jnp.float32 and all(ld.dtype == jnp.float32 for ld in out16.logdets)
    # and bfloat16 really was used, for every matmul
    assert l16 != l32
    dots = {}
    for name, m in (("f32", model32), ("bf16", model16)):
        graphdef, state = nnx.split(m)
        dots[name] = matmul_operand_dtypes(lambda s, x, y: nnx.merge(graphdef, s)(x, y), state, x, y)  # noqa: B023 (called at once)
    assert len(dots["bf16"]) == len(dots["f32"]) >= 4 * cfg.num_blocks
    assert all(d == ("float32", "float32") for d in dots["f32"])
    assert all(d == ("bfloat16", "bfloat16") for d in dots["bf16"]), dots["bf16"]


# ------------------------------------------------------------------ (e) stacked parameters
def test_layer_parameters_are_stacked():
    cfg = ModelConfig(**{**TINY, "rope": True, "layers_per_block": (3, 1, 2)})
    model = make(cfg)
    for block, n in zip(model.blocks, (3, 1, 2)):
        leaves = jax.tree.leaves(nnx.state(block.attn_blocks, nnx.Param))
        assert leaves
        assert all(leaf.shape[0] == n for leaf in leaves), [leaf.shape for leaf in leaves]
        # the per-layer shapes are the unstacked ones: e.g. a (channels,) norm weight per layer
        assert any(leaf.shape == (n, cfg.channels) for leaf in leaves)
    # a real initialisation draws every layer of a stack independently
    real = nnx.jit(lambda: StarFlow(cfg.replace(num_blocks=1, layers_per_block=(3,)), rngs=nnx.Rngs(0)))()
    qkv = [
        leaf
        for path, leaf in nnx.to_flat_state(nnx.state(real.blocks[0].attn_blocks, nnx.Param))
        if "qkv" in [str(p) for p in path] and str(path[-1]) == "kernel"
    ]
    assert len(qkv) == 1
    w = np.asarray(qkv[0][...])
    assert w.shape == (3, cfg.channels, 3 * cfg.channels)
    assert not np.array_equal(w[0], w[1]) and not np.array_equal(w[1], w[2])


# ------------------------------------------------------------------ (f) identity block
def test_identity_block():
    cfg = ModelConfig(**{**TINY, "rope": True, "sos": True, "num_blocks": 4, "layers_per_block": (1, 0, 0, 2)})
    model = make(cfg, seed=12)
    assert isinstance(model.blocks[1], IdentityBlock) and isinstance(model.blocks[2], IdentityBlock)
    assert isinstance(model.blocks[0], FlowBlock) and isinstance(model.blocks[3], FlowBlock)
    for i in (1, 2):
        assert jax.tree.leaves(nnx.state(model.blocks[i], nnx.Param)) == []
    x = normal((2, 2, 2, 2), 13)
    out = jitted(model)(x)
    for i in (1, 2):
        assert out.logdets[i].shape[0] == 2
        np.testing.assert_array_equal(np.asarray(out.logdets[i]), np.zeros(out.logdets[i].shape))
        np.testing.assert_array_equal(np.asarray(out.outputs[i + 1]), np.asarray(out.outputs[i]))
    # the same as a two-block model holding the other blocks' weights (blocks 0 and 3 of an
    # R2L stack of 4 read in identity / flip order, like blocks 0 and 1 of a stack of 2)
    assert [b.order for b in (model.blocks[0], model.blocks[3])] == ["identity", "flip"]
    ref = nnx.eval_shape(lambda: StarFlow(cfg.replace(num_blocks=2, layers_per_block=(1, 2)), rngs=nnx.Rngs(0)))
    ref_state = nnx.State({"blocks": {0: nnx.state(model.blocks[0]), 1: nnx.state(model.blocks[3])}})
    ref_out = jitted(nnx.merge(nnx.graphdef(ref), ref_state))(x)
    np.testing.assert_allclose(np.asarray(ref_out.z), np.asarray(out.z), atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        float(nll_loss(ref_out.z, ref_out.logdets)), float(nll_loss(out.z, out.logdets)), rtol=1e-6
    )


def test_identity_block_in_a_local_video_model():
    cfg = ModelConfig(**{**VIDEO, "layers_per_block": (0, 1, 1)})
    model = make(cfg, seed=14)
    assert jax.tree.leaves(nnx.state(model.blocks[0], nnx.Param)) == []
    x = normal((2, 3, 2, 2, 2), 15)
    out = jitted(model)(x, normal((2, 3, 5), 16))
    np.testing.assert_array_equal(np.asarray(out.logdets[0]), np.zeros(out.logdets[0].shape))
    np.testing.assert_array_equal(np.asarray(out.outputs[1]), np.asarray(out.outputs[0]))
    assert out.z.shape == x.shape


# ------------------------------------------------------------------ (g) learnable denoiser
def test_denoiser_output_shape_image():
    cfg = ModelConfig(
        **{**TINY, "img_size": 4, "patch_size": 2, "rope": True, "learnable_self_denoiser": True, "denoiser_layers": 2}
    )
    denoise = jitted(make(cfg, seed=17), "denoise")
    x = normal((2, 2, 4, 4), 18)
    out = denoise(x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out))) > 1e-3  # random weights: not the zero-initialised output
    # the denoiser is not causal: its output for the first patch depends on the last one
    out2 = denoise(x.at[:, :, 2:, 2:].add(1.0))
    assert float(jnp.max(jnp.abs(out2[:, :, :2, :2] - out[:, :, :2, :2]))) > 1e-4


def test_denoiser_output_shape_video_conditional():
    cfg = ModelConfig(
        **{
            **VIDEO,
            "learnable_self_denoiser": True,
            "conditional_denoiser": True,
            "denoiser_window": 1,
            "denoiser_layers": 1,
        }
    )
    denoise = jitted(make(cfg, seed=19), "denoise")
    x = normal((2, 3, 2, 2, 2), 20)
    y = normal((2, 3, 5), 21)
    out = denoise(x, y)
    assert out.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(out)))

    # block-causal in time with a window of 1 frame back: frame f reads frames f-1 and f
    def frame_diffs(x2):
        o = denoise(x2, y)
        return [float(jnp.max(jnp.abs(o[:, f] - out[:, f]))) for f in range(3)]

    d0 = frame_diffs(x.at[:, 0].add(1.0))
    assert d0[0] > 1e-4 and d0[1] > 1e-4 and d0[2] == 0.0
    d2 = frame_diffs(x.at[:, 2].add(1.0))
    assert d2[0] == 0.0 and d2[1] == 0.0 and d2[2] > 1e-4
    # conditional: y changes the prediction
    assert float(jnp.max(jnp.abs(denoise(x, y + 1.0) - out))) > 1e-4


def test_denoise_without_denoiser_raises():
    model = make(ModelConfig(**{**TINY, "rope": True}))
    assert model.learnable_self_denoiser is None
    with pytest.raises(ValueError, match="no learnable denoiser"):
        model.denoise(jnp.zeros((1, 2, 2, 2)))
