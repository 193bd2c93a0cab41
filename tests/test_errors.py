"""Bad input gets a clear error naming the problem."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starflow_jax.config import ConfigError, ModelConfig
from starflow_jax.config.reference_args import from_model_kwargs, read_yaml_arguments
from starflow_jax.interop import reference_cases as rc
from starflow_jax.interop.state_dict import StateDictMismatch, from_reference, load_reference_model
from starflow_jax.model import StarFlow

TINY = dict(in_channels=3, img_size=8, patch_size=2, channels=32, num_blocks=2, layers_per_block=(1, 1),
            head_dim=32, rope=True, sos=True, txt_size=2, txt_dim=5, use_softplus=True)


@pytest.fixture(scope="module")
def model():
    return StarFlow(ModelConfig(**TINY), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("x_shape,y_shape,message", [
    ((2, 3, 8), (2, 2, 5), "rank 3"),
    ((2, 4, 8, 8), (2, 2, 5), "4 channels"),
    ((2, 3, 9, 9), (2, 2, 5), "not divisible by patch_size=2"),
    ((2, 3, 8, 8), (2, 2, 6), "txt_dim=5"),
    ((2, 3, 8, 8), (2, 3, 5), "txt_size=2"),
    ((2, 3, 8, 8), (3, 2, 5), "batch 3 but x has batch 2"),
    ((2, 3, 8, 8), None, "pass y of shape"),
])
def test_bad_model_inputs(model, x_shape, y_shape, message):
    x = jnp.zeros(x_shape)
    y = None if y_shape is None else jnp.zeros(y_shape)
    with pytest.raises(ValueError, match=message):
        model(x, y)


@pytest.mark.parametrize("change,message", [
    (dict(colour=3), "unknown model config keys: \\['colour'\\]"),
    (dict(layers_per_block=(1, 1, 1)), "3 entries but num_blocks=2"),
    (dict(shallow_block_local=True), "shallow_block_local requires cond_top_only"),
    (dict(num_heads=3, num_kv_heads=2, head_dim=8), "not a multiple of num_kv_heads"),
    (dict(norm_type="batch_norm"), "norm_type must be one of"),
    (dict(img_size=9), "not divisible by patch_size"),
    (dict(layers_per_block=(1, 0)), "top \\(last\\) block must have at least one layer"),
])
def test_bad_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**TINY, **change})


def test_bad_reference_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown reference Model arguments: \\['use_magic'\\]"):
        from_model_kwargs({**TINY, "use_magic": 1})
    with pytest.raises(ConfigError, match="not supported"):
        from_model_kwargs({**TINY, "use_pretrained_lm": "gemma2_2b"})
    path = tmp_path / "x.yaml"
    path.write_text("img_size: 3\n")
    with pytest.raises(ConfigError, match="no top-level 'arguments:' list"):
        read_yaml_arguments(path)


def _case_state(name):
    case = rc.load_case([p for p in rc.discover() if p.stem == name][0])
    cfg = from_model_kwargs(case.meta["model_kwargs"])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))))
    return case, cfg, state


def test_state_dict_mismatches_are_listed():
    case, cfg, state = _case_state("t2i_small")
    sd = case.params()
    good_key = "blocks.2.attn_blocks.1.mlp.main.0.weight"
    broken = dict(sd)
    del broken[good_key]
    broken["blocks.9.proj_in.weight"] = np.zeros((2, 2), np.float32)
    broken["blocks.0.proj_in.bias"] = np.zeros((3,), np.float32)
    nan_w = np.array(sd["blocks.1.proj_out.weight"])
    nan_w[0, 0] = np.nan
    broken["blocks.1.proj_out.weight"] = nan_w
    with pytest.raises(StateDictMismatch) as info:
        from_reference(state, broken)
    err = info.value
    assert err.missing == [good_key]
    assert err.unexpected == ["blocks.9.proj_in.weight"]
    assert err.mismatched == [("blocks.0.proj_in.bias", (3,), (64,))]
    assert err.nonfinite == ["blocks.1.proj_out.weight"]
    text = str(err)
    for phrase in ("missing keys (1)", "unexpected keys (1)", "got (3,), expected (64,)", "NaN or Inf"):
        assert phrase in text


def test_state_dict_of_another_architecture():
    case, _, _ = _case_state("t2i_small")
    other = from_model_kwargs({**case.meta["model_kwargs"], "channels": 96, "use_swiglu": 1})
    with pytest.raises(StateDictMismatch, match="mis-shaped keys") as info:
        load_reference_model(other, case.params())
    assert any("gate_proj" in k for k in info.value.missing)
    assert any("mlp.main.0" in k for k in info.value.unexpected)


def test_deprecated_buffers_are_ignored_and_reported():
    case, cfg, state = _case_state("video_small")
    report = []
    from_reference(state, case.params(), report=report)
    assert "var" in report and "feat_rope.freqs_cos" in report and "blocks.0.attn_mask" in report
    assert all(k.endswith(".attn_mask") or k.startswith(("var", "feat_rope")) for k in report)
