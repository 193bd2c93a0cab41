"""Reference names both ways: exact round trips, expected shapes, deprecated buffers, and the
conversion of a reference YAML configuration."""

import pathlib

import jax
import numpy as np
import pytest
from conftest import reference_case
from flax import nnx

from starflow_jax.config import load_config, model_config
from starflow_jax.config.reference_args import from_model_kwargs, model_config_from_yaml
from starflow_jax.interop import reference_cases as rc
from starflow_jax.interop.state_dict import (
    expected_reference_shapes,
    from_reference,
    is_deprecated_buffer,
    reference_buffers,
    to_reference,
)
from starflow_jax.model import StarFlow

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMED = ["t2i_small", "gemma_style_top"]
ALL = sorted(p.stem for p in rc.discover())


def _load(name):
    case = reference_case(name)  # skipped, saying why, when the cases directory lacks it
    cfg = from_model_kwargs(case.meta["model_kwargs"])
    _, abstract = nnx.split(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))))
    everything = case.params()
    params = {k: v for k, v in everything.items() if not is_deprecated_buffer(k)}
    buffers = {k: v for k, v in everything.items() if is_deprecated_buffer(k)}
    return case, cfg, abstract, params, buffers


@pytest.mark.parametrize("name", NAMED + [n for n in ALL if n not in NAMED])
def test_round_trip_is_exact(name):
    case, _, abstract, params, buffers = _load(name)
    assert params and buffers
    loaded = from_reference(abstract, case.params())
    # concrete arrays now, in the parameter dtype
    assert all(isinstance(leaf, jax.Array) and leaf.dtype == np.float32 for leaf in jax.tree.leaves(loaded))
    back = to_reference(loaded)
    assert set(back) == set(params)
    for k, v in params.items():
        assert back[k].dtype == v.dtype, k
        assert back[k].shape == v.shape, k
        assert np.array_equal(back[k], v), k


def test_round_trip_transposes_kernels_and_stacks_layers():
    case, cfg, abstract, params, _ = _load("t2i_small")
    loaded = nnx.to_flat_state(from_reference(abstract, params))
    flat = {tuple(str(p) for p in path): v[...] for path, v in loaded}
    # torch Linear (out, in) -> our kernel (in, out)
    np.testing.assert_array_equal(flat[("blocks", "0", "proj_in", "kernel")], params["blocks.0.proj_in.weight"].T)
    # per-layer entries -> one array with a leading layer axis (the top block has 2 layers)
    qkv = flat[("blocks", "2", "attn_blocks", "attention", "qkv", "kernel")]
    assert qkv.shape[0] == cfg.layers_per_block[2] == 2
    for j in range(2):
        np.testing.assert_array_equal(qkv[j], params[f"blocks.2.attn_blocks.{j}.attention.qkv.weight"].T)
    np.testing.assert_array_equal(
        flat[("blocks", "2", "attn_blocks", "mlp", "fc1", "bias")][1], params["blocks.2.attn_blocks.1.mlp.main.0.bias"]
    )


def test_round_trip_from_our_side():
    """A random state of ours -> reference names -> back: the same state."""
    _, cfg, abstract, _, _ = _load("gemma_style_top")
    rng = np.random.default_rng(0)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))))
    ours = jax.tree.map(lambda s: jax.numpy.asarray(rng.standard_normal(s.shape).astype(s.dtype)), abstract)
    sd = to_reference(ours)
    again = from_reference(abstract, sd)
    a, b = jax.tree.leaves(ours), jax.tree.leaves(again)
    assert len(a) == len(b)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    # and the model built from it runs
    nnx.merge(graphdef, again)


@pytest.mark.parametrize("name", NAMED + [n for n in ALL if n not in NAMED])
def test_expected_reference_shapes(name):
    _, _, abstract, params, _ = _load(name)
    shapes = expected_reference_shapes(abstract)
    assert shapes == {k: tuple(v.shape) for k, v in params.items()}


@pytest.mark.parametrize("name", NAMED + [n for n in ALL if n not in NAMED])
def test_reference_buffers(name):
    _, cfg, _, params, buffers = _load(name)
    ours = reference_buffers(cfg)
    assert set(ours) == set(buffers)
    assert not set(ours) & set(params)
    for k, v in buffers.items():
        assert ours[k].shape == v.shape and ours[k].dtype == v.dtype, k
        if k.endswith(".attn_mask"):
            n = v.shape[0]
            assert v.shape == (n, n)
            np.testing.assert_array_equal(ours[k], np.tril(np.ones((n, n), np.float32)), err_msg=k)
        elif k == "var":
            np.testing.assert_array_equal(ours[k], np.ones(v.shape, np.float32))
        else:
            assert k in ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
            np.testing.assert_array_equal(ours[k], np.zeros(v.shape, np.float32))
        np.testing.assert_array_equal(ours[k], v, err_msg=k)


# ------------------------------------------------------------------ reference YAML
STARFLOW_3B_YAML = """\
arguments:
- img_size: 256
- txt_size: 128
- channel_size: 4
- patch_size: 1
- channels: 3072
- blocks: 6
- layers_per_block: 2 2 2 2 2 24
- noise_std: 0.3
- rope: 1
- sos: 1
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- vae: stabilityai/sd-vae-ft-ema
- text: google/flan-t5-xl
- soft_clip: 4
"""


def test_reference_yaml_conversion(tmp_path):
    path = tmp_path / "starflow_3B_t2i_256x256.yaml"
    path.write_text(STARFLOW_3B_YAML)
    cfg = model_config_from_yaml(path)
    assert cfg.in_channels == 4
    assert cfg.img_size == 32  # 256 // 8, the SD-VAE's downsampling
    assert cfg.patch_size == 1
    assert cfg.channels == 3072
    assert cfg.num_blocks == 6
    assert cfg.layers_per_block == (2, 2, 2, 2, 2, 24)
    assert cfg.txt_size == 128
    assert cfg.txt_dim == 2048  # FLAN-T5-XL
    assert cfg.sos is True
    assert cfg.use_softplus is True
    assert cfg.soft_clip == 4.0 and isinstance(cfg.soft_clip, float)
    assert cfg.seq_order == "L2R"
    assert cfg.rope is True and cfg.cond_top_only is True and cfg.use_final_norm is True
    # train.py defaults for what the YAML leaves out
    assert cfg.head_dim == 64 and cfg.norm_type == "layer_norm" and cfg.use_bias is True
    assert cfg.temporal_causal == 0 and not cfg.learnable_self_denoiser
    # the config loader reads the same YAML to the same model
    assert model_config(load_config(path)) == cfg
    # and agrees with the project's ml-collections version of this configuration, which
    # computes in bfloat16 (the reference trains under bfloat16 autocast)
    assert model_config(load_config(REPO / "configs" / "starflow_3b_t2i_256.py")) == cfg.replace(dtype="bfloat16")
