"""Bad input gets a clear error that names the problem: model inputs, configurations,
reference arguments and YAML files, reference state dicts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_case
from flax import nnx

from starflow_jax.config import ConfigError, ModelConfig
from starflow_jax.config.reference_args import from_model_kwargs, read_yaml_arguments
from starflow_jax.interop.named_tensors import StateDictMismatch
from starflow_jax.interop.state_dict import (
    from_reference,
    is_deprecated_buffer,
    load_reference_model,
    to_reference,
)
from starflow_jax.model import StarFlow

TINY = dict(
    in_channels=3,
    img_size=8,
    patch_size=2,
    channels=32,
    num_blocks=2,
    layers_per_block=(1, 1),
    head_dim=32,
    rope=True,
    sos=True,
    txt_size=2,
    txt_dim=5,
    use_softplus=True,
)


def build(cfg: ModelConfig) -> StarFlow:
    """A concrete model of ``cfg`` (zero weights; built abstractly, which is fast)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


@pytest.fixture(scope="module")
def model():
    return build(ModelConfig(**TINY))


# ------------------------------------------------------------------ model inputs
def test_good_input_is_accepted(model):
    out = model(jnp.zeros((2, 3, 8, 8)), jnp.zeros((2, 2, 5)))
    assert out.z.shape == (2, 3, 8, 8)


@pytest.mark.parametrize(
    "x_shape,y_shape,message",
    [
        ((2, 3, 8), (2, 2, 5), r"image batch \(b, c, h, w\) or a video batch .* got rank 3"),
        ((2, 3, 8, 8, 8, 8), (2, 2, 5), r"got rank 6"),
        ((2, 4, 8, 8), (2, 2, 5), r"x has 4 channels .* expects in_channels=3"),
        ((2, 3, 4, 8, 8), (2, 2, 5), r"x has 4 channels \(axis 2 of shape \(2, 3, 4, 8, 8\)\)"),
        ((2, 3, 9, 9), (2, 2, 5), r"spatial size 9x9 is not divisible by patch_size=2"),
        ((2, 3, 8, 7), (2, 2, 5), r"spatial size 8x7 is not divisible by patch_size=2"),
        ((2, 3, 8, 8), (2, 2, 6), r"conditioning y has shape \(2, 2, 6\), expected \(b, txt_size=2, txt_dim=5\)"),
        ((2, 3, 8, 8), (2, 3, 5), r"conditioning y has shape \(2, 3, 5\), expected \(b, txt_size=2"),
        ((2, 3, 8, 8), (2, 10), r"conditioning y has shape \(2, 10\)"),
        ((2, 3, 8, 8), (3, 2, 5), r"conditioning y has batch 3 but x has batch 2"),
        ((2, 3, 8, 8), None, r"the model is conditioned \(txt_dim=5\); pass y of shape \(b, 2, 5\)"),
    ],
    ids=[
        "rank3",
        "rank6",
        "channels",
        "video-channels",
        "patch",
        "patch-w",
        "y-width",
        "y-length",
        "y-rank",
        "y-batch",
        "y-missing",
    ],
)
def test_bad_model_inputs(model, x_shape, y_shape, message):
    x = jnp.zeros(x_shape)
    y = None if y_shape is None else jnp.zeros(y_shape)
    with pytest.raises(ValueError, match=message):
        model(x, y)


def test_bad_inputs_of_the_denoiser():
    model = build(
        ModelConfig(**{**TINY, "learnable_self_denoiser": True, "conditional_denoiser": True, "denoiser_layers": 1})
    )
    with pytest.raises(ValueError, match=r"x has 4 channels"):
        model.denoise(jnp.zeros((2, 4, 8, 8)), jnp.zeros((2, 2, 5)))
    with pytest.raises(ValueError, match=r"pass y of shape"):
        model.denoise(jnp.zeros((2, 3, 8, 8)))


def test_learned_position_embeddings_need_the_configured_size():
    model = build(ModelConfig(**{**TINY, "rope": False, "txt_size": 0, "txt_dim": 0}))
    with pytest.raises(ValueError, match=r"spatial size 4x4 must equal img_size=8 .*rope=False"):
        model(jnp.zeros((1, 3, 4, 4)))


def test_video_with_rope_needs_text_positions():
    model = build(ModelConfig(**{**TINY, "txt_size": 0, "txt_dim": 0}))
    with pytest.raises(ValueError, match=r"video input with RoPE needs a model with txt_size > 0"):
        model(jnp.zeros((1, 2, 3, 8, 8)))


# ------------------------------------------------------------------ configurations
@pytest.mark.parametrize(
    "change,message",
    [
        (dict(colour=3), r"unknown model config keys: \['colour'\]"),
        (dict(colour=3, depth=2), r"unknown model config keys: \['colour', 'depth'\]"),
        (dict(layers_per_block=(1, 1, 1)), r"layers_per_block has 3 entries but num_blocks=2"),
        (dict(layers_per_block="1 1 1"), r"layers_per_block has 3 entries but num_blocks=2"),
        (dict(shallow_block_local=True), r"shallow_block_local requires cond_top_only"),
        (dict(channels=32, head_dim=8, num_kv_heads=3, rope=False), r"num_heads=4 is not a multiple of num_kv_heads=3"),
        (dict(num_heads=6, num_kv_heads=4), r"num_heads=6 is not a multiple of num_kv_heads=4"),
        (
            dict(channels=64, top_block_channels=96, num_kv_heads=2),
            r"num_heads=3 is not a multiple of num_kv_heads=2 \(top_block",
        ),
        (dict(norm_type="batch_norm"), r"norm_type must be one of"),
        (dict(seq_order="T2B"), r"seq_order must be one of"),
        (dict(dtype="float8"), r"dtype must be one of"),
        (dict(img_size=9), r"img_size=9 is not divisible by patch_size=2"),
        (dict(layers_per_block=(1, 0)), r"top \(last\) block must have at least one layer"),
        (dict(layers_per_block=(-1, 1)), r"layers_per_block must be >= 0"),
        (dict(channels=0), r"channels must be a positive integer"),
        (dict(txt_size=0), r"txt_dim=5 needs txt_size > 0"),
        (dict(temporal_causal=1), r"seq_order must be L2R when temporal_causal is set"),
        (dict(head_dim=16), r"rope with text positions needs head_dim > 16"),
    ],
    ids=lambda v: "+".join(v) if isinstance(v, dict) else "",
)
def test_bad_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**TINY, **change})


def test_config_errors_are_value_errors_and_missing_keys_are_named():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match=r"missing required keys: \['channels'\]"):
        ModelConfig.from_dict({k: v for k, v in TINY.items() if k != "channels"})
    with pytest.raises(ConfigError, match=r"shallow_block_local requires cond_top_only"):
        ModelConfig(**{**TINY, "shallow_block_local": True})


def test_bad_reference_arguments(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown reference Model arguments: \['use_magic'\]"):
        from_model_kwargs({**TINY, "use_magic": 1})
    # torch-only execution options are accepted and dropped
    assert from_model_kwargs({**TINY, "use_checkpoint": 1}) == ModelConfig(**TINY)
    with pytest.raises(ConfigError, match=r"use_pretrained_lm='gemma2_2b' .* is not supported"):
        from_model_kwargs({**TINY, "use_pretrained_lm": "gemma2_2b"})


def test_yaml_without_arguments(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text("img_size: 256\nchannels: 512\n")
    with pytest.raises(ConfigError, match=r"plain.yaml: not a reference configuration \(no top-level 'arguments:'"):
        read_yaml_arguments(path)
    path.write_text("- img_size: 256\n")
    with pytest.raises(ConfigError, match=r"no top-level 'arguments:' list"):
        read_yaml_arguments(path)
    path.write_text("arguments:\n- img_size: 256\n  channels: 512\n")
    with pytest.raises(ConfigError, match=r"every entry of 'arguments' must be one 'key: value'"):
        read_yaml_arguments(path)
    path.write_text("arguments:\n- img_size: 256\n- channels: 512\n")
    assert read_yaml_arguments(path) == {"img_size": 256, "channels": 512}


# ------------------------------------------------------------------ state dicts
@pytest.fixture(scope="module")
def t2i():
    case = reference_case("t2i_small")
    cfg = from_model_kwargs(case.meta["model_kwargs"])
    _, state = nnx.split(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))))
    return case, cfg, state


def _mismatch(state, sd, message) -> StateDictMismatch:
    with pytest.raises(StateDictMismatch, match=message) as info:
        from_reference(state, sd)
    assert isinstance(info.value, ValueError)
    return info.value


def test_state_dict_fits(t2i):
    case, _, state = t2i
    loaded = to_reference(from_reference(state, case.params()))
    assert loaded  # the baseline for the errors below: the unmodified dict loads


def test_state_dict_missing_key(t2i):
    case, _, state = t2i
    sd = case.params()
    key = "blocks.2.attn_blocks.1.mlp.main.0.weight"
    del sd[key]
    err = _mismatch(state, sd, r"missing keys \(1\): \['blocks\.2\.attn_blocks\.1\.mlp\.main\.0\.weight'\]")
    assert err.missing == [key] and not err.unexpected and not err.mismatched and not err.nonfinite


def test_state_dict_unexpected_key(t2i):
    case, _, state = t2i
    sd = case.params()
    sd["blocks.9.proj_in.weight"] = np.zeros((2, 2), np.float32)
    err = _mismatch(state, sd, r"unexpected keys \(1\): \['blocks\.9\.proj_in\.weight'\]")
    assert err.unexpected == ["blocks.9.proj_in.weight"] and not err.missing and not err.mismatched


def test_state_dict_wrong_shape(t2i):
    case, _, state = t2i
    sd = case.params()
    sd["blocks.0.proj_in.bias"] = np.zeros((3,), np.float32)
    sd["blocks.1.proj_out.weight"] = sd["blocks.1.proj_out.weight"].T  # a kernel given in our (in, out) layout
    err = _mismatch(state, sd, r"mis-shaped keys \(2\): .*blocks\.0\.proj_in\.bias: got \(3,\), expected \(64,\)")
    assert err.mismatched == [("blocks.0.proj_in.bias", (3,), (64,)), ("blocks.1.proj_out.weight", (64, 8), (8, 64))]
    assert "blocks.1.proj_out.weight: got (64, 8), expected (8, 64)" in str(err)
    assert not err.missing and not err.unexpected


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_state_dict_non_finite_weight(t2i, bad):
    case, _, state = t2i
    sd = case.params()
    w = np.array(sd["blocks.2.attn_blocks.0.attention.qkv.weight"])
    w[3, 5] = bad
    sd["blocks.2.attn_blocks.0.attention.qkv.weight"] = w
    err = _mismatch(state, sd, r"keys with NaN or Inf \(1\): \['blocks\.2\.attn_blocks\.0\.attention\.qkv\.weight'\]")
    assert err.nonfinite == ["blocks.2.attn_blocks.0.attention.qkv.weight"]
    # the check can be turned off deliberately
    loaded = to_reference(from_reference(state, sd, check_finite=False))
    assert not np.isfinite(loaded["blocks.2.attn_blocks.0.attention.qkv.weight"][3, 5])


def test_all_problems_are_listed_together(t2i):
    case, _, state = t2i
    sd = case.params()
    del sd["blocks.0.proj_in.weight"]
    sd["extra.weight"] = np.zeros(1, np.float32)
    sd["blocks.0.proj_in.bias"] = np.zeros((3,), np.float32)
    sd["blocks.2.proj_out.bias"] = np.full_like(sd["blocks.2.proj_out.bias"], np.nan)
    err = _mismatch(state, sd, r"missing keys \(1\)")
    text = str(err)
    for phrase in (
        "missing keys (1)",
        "unexpected keys (1)",
        "mis-shaped keys (1)",
        "keys with NaN or Inf (1)",
        "blocks.0.proj_in.weight",
        "extra.weight",
        "blocks.0.proj_in.bias",
        "blocks.2.proj_out.bias",
    ):
        assert phrase in text, phrase


def test_state_dict_of_another_architecture(t2i):
    case, cfg, _ = t2i
    other = from_model_kwargs({**case.meta["model_kwargs"], "channels": 96})
    with pytest.raises(
        StateDictMismatch,
        match=r"mis-shaped keys .*blocks\.0\.proj_in\.weight: got \(64, 4\), "
        r"expected \(96, 4\)",
    ) as info:
        load_reference_model(other, case.params())
    assert len(info.value.mismatched) > 10
    assert not info.value.missing and not info.value.unexpected
    # a SwiGLU model: other parameter names, listed as missing and unexpected
    swiglu = from_model_kwargs({**case.meta["model_kwargs"], "use_swiglu": 1})
    with pytest.raises(StateDictMismatch, match=r"(?s)missing keys .*unexpected keys") as info:
        load_reference_model(swiglu, case.params())
    assert any("gate_proj" in k for k in info.value.missing)
    assert any(k.endswith("mlp.main.0.weight") for k in info.value.unexpected)
    # more blocks than the state dict has
    deeper = from_model_kwargs({**case.meta["model_kwargs"], "num_blocks": 4, "layers_per_block": [1, 1, 1, 2]})
    with pytest.raises(StateDictMismatch, match=r"missing keys") as info:
        load_reference_model(deeper, case.params())
    assert all(k.startswith("blocks.3.") or k.startswith("blocks.2.") for k in info.value.missing)


def test_deprecated_buffers_are_ignored_and_reported(t2i):
    case, _, state = t2i
    sd = case.params()
    buffers = sorted(k for k in sd if is_deprecated_buffer(k))
    assert buffers == sorted(
        [
            "var",
            "feat_rope.freqs_cos",
            "feat_rope.freqs_sin",
            "blocks.0.attn_mask",
            "blocks.1.attn_mask",
            "blocks.2.attn_mask",
        ]
    )
    report = []
    loaded = to_reference(from_reference(state, sd, report=report))
    assert report == buffers
    assert not set(loaded) & set(buffers)
    # their values do not matter (they carry no information) ...
    junk = dict(sd, var=np.full((3, 3), np.nan, np.float32), **{"blocks.0.attn_mask": np.zeros((1,), np.float32)})
    report2 = []
    loaded2 = to_reference(from_reference(state, junk, report=report2))
    assert report2 == buffers
    assert all(np.array_equal(loaded[k], loaded2[k]) for k in loaded)
    # ... nor does their absence
    report3 = []
    from_reference(state, {k: v for k, v in sd.items() if k not in buffers}, report=report3)
    assert report3 == []
    # load_reference_model reports them too
    report4 = []
    load_reference_model(from_model_kwargs(case.meta["model_kwargs"]), sd, report=report4)
    assert report4 == buffers
