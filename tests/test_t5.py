"""The T5 encoder against transformers on small random models, weight conversion, and
the reference's prompt preparation with a tokenizer built offline in the test."""

import ast
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
spm = pytest.importorskip("sentencepiece")

from starflow_jax.interop.named_tensors import StateDictMismatch  # noqa: E402
from starflow_jax.text import (
    T5Config,
    encode_prompts,
    load_tokenizer,
    null_embedding,  # noqa: E402
    prepare_prompts,
    relative_position_buckets,
    t5_from_transformers,
    tokenize,
)

TOL = 1e-4
SMALL = dict(
    vocab_size=200,
    d_model=64,
    d_kv=16,
    num_heads=4,
    num_layers=3,
    d_ff=128,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
)
REFERENCE_REPO = os.environ.get("STARFLOW_REFERENCE_REPO")


def hf_encoder(feed_forward_proj="gated-gelu", seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.T5Config(**{**SMALL, **overrides}, feed_forward_proj=feed_forward_proj)
    return transformers.T5EncoderModel(config).eval()


def hf_hidden(model, ids, mask):
    with torch.no_grad():
        return model(
            input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
            attention_mask=torch.as_tensor(np.asarray(mask), dtype=torch.long),
        ).last_hidden_state.numpy()


def padded_batch(seed=0, length=24):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 200, size=(4, length))
    mask = np.ones_like(ids)
    for row, n in enumerate([length, 15, 6, 1]):
        mask[row, n:] = 0
        ids[row, n:] = 0
    return ids, mask


def rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float32) - want)) / np.max(np.abs(want)))


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for buckets, distance in [(32, 128), (64, 256), (16, 32)]:
        for length in (1, 9, 300):
            rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
            want = T5Attention._relative_position_bucket(rel, True, buckets, distance).numpy()
            np.testing.assert_array_equal(relative_position_buckets(length, length, buckets, distance), want)


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_encoder_matches_transformers(feed_forward_proj):
    model = hf_encoder(feed_forward_proj)
    ids, mask = padded_batch()
    want = hf_hidden(model, ids, mask)
    encoder = t5_from_transformers(model.state_dict(), model.config)
    err = rel_err(encoder(jnp.asarray(ids), jnp.asarray(mask)), want)
    # the reference keeps the bare T5Stack (`.encoder`): its state dict has no `encoder.` prefix
    stack = t5_from_transformers(model.encoder.state_dict(), T5Config.from_transformers_config(model.config))
    err_stack = rel_err(stack(jnp.asarray(ids), jnp.asarray(mask)), want)
    print(
        f"\nT5 encoder parity ({feed_forward_proj}, float32, padded batch): rel err {err:.2e}, "
        f"from T5Stack keys {err_stack:.2e}"
    )
    assert err < TOL and err_stack < TOL


def test_bfloat16_compute_close_to_float32():
    model = hf_encoder()
    ids, mask = padded_batch()
    want = hf_hidden(model, ids, mask)
    encoder = t5_from_transformers(model.state_dict(), model.config, dtype="bfloat16")
    assert encoder.layers.attention.q.kernel[...].dtype == jnp.float32
    out = encoder(jnp.asarray(ids), jnp.asarray(mask))
    err = rel_err(out, want)
    print(f"\nT5 encoder bfloat16 compute vs transformers float32: rel err {err:.2e}")
    assert out.dtype == jnp.float32 and err < 5e-2


def test_from_save_pretrained_directories(tmp_path):
    ids, mask = padded_batch(1)
    model = hf_encoder(seed=1)
    model.save_pretrained(tmp_path / "encoder")
    err = rel_err(
        t5_from_transformers(tmp_path / "encoder")(jnp.asarray(ids), jnp.asarray(mask)), hf_hidden(model, ids, mask)
    )

    # a full encoder-decoder checkpoint in shards: the decoder and lm_head are ignored
    torch.manual_seed(2)
    full = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**SMALL, feed_forward_proj="gated-gelu")
    ).eval()
    full.save_pretrained(tmp_path / "full", max_shard_size="100KB")
    assert (tmp_path / "full" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        want = full.encoder(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).last_hidden_state
    err_full = rel_err(t5_from_transformers(tmp_path / "full")(jnp.asarray(ids), jnp.asarray(mask)), want.numpy())

    # pytorch_model.bin, stored in bfloat16
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, tmp_path / "bin" / "pytorch_model.bin")
    encoder = t5_from_transformers(tmp_path / "bin")
    bf16 = hf_encoder(seed=1).to(torch.bfloat16).float()  # the same rounding of the weights
    err_bin = rel_err(encoder(jnp.asarray(ids), jnp.asarray(mask)), hf_hidden(bf16, ids, mask))
    print(
        f"\nT5 from directories: save_pretrained {err:.2e}, sharded full T5 {err_full:.2e}, "
        f"bfloat16 pytorch_model.bin {err_bin:.2e}"
    )
    assert max(err, err_full, err_bin) < TOL

    with pytest.raises(ValueError, match="no weights"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        t5_from_transformers(tmp_path / "empty")


def test_bad_state_dict_lists_every_problem():
    model = hf_encoder()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["encoder.block.1.layer.0.SelfAttention.q.weight"]
    sd["encoder.block.2.layer.1.DenseReluDense.wo.weight"] = torch.zeros(64, 64)
    sd["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, 4)
    sd["encoder.final_layer_norm.weight"][3] = float("nan")
    sd["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(3, 3)  # ignored
    with pytest.raises(StateDictMismatch) as info:
        t5_from_transformers(sd, model.config)
    msg = str(info.value)
    assert "missing keys (1): ['encoder.block.1.layer.0.SelfAttention.q.weight']" in msg
    assert "unexpected keys (1): ['encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight']" in msg
    assert "encoder.block.2.layer.1.DenseReluDense.wo.weight: got (64, 64), expected (64, 128)" in msg
    assert "NaN or Inf (1): ['encoder.final_layer_norm.weight']" in msg
    assert "decoder" not in msg
    with pytest.raises(ValueError, match="needs config"):
        t5_from_transformers(model.state_dict())
    relu_sd = hf_encoder("relu").state_dict()  # wi instead of wi_0 / wi_1
    with pytest.raises(StateDictMismatch, match="DenseReluDense.wi_0.weight"):
        t5_from_transformers(relu_sd, model.config)


def test_config_from_transformers():
    cfg = T5Config.from_transformers_config(
        {
            **SMALL,
            "feed_forward_proj": "gated-gelu",
            "num_decoder_layers": 7,
            "decoder_start_token_id": 0,
            "tie_word_embeddings": False,
        }
    )
    assert cfg.gated and cfg.activation == "gelu_new" and cfg.num_layers == 3 and cfg.d_ff == 128
    assert T5Config.from_transformers_config({"feed_forward_proj": "relu"}).activation == "relu"
    for bad, match in [
        ({"model_type": "umt5"}, "umt5"),
        ({"is_decoder": True}, "decoder"),
        ({"feed_forward_proj": "gated-foo"}, "activation 'foo'"),
        ({"feed_forward_proj": "fancy-relu"}, "gated-ACT"),
        ({"quantization_config": {"bits": 8}}, "quantized"),
        ({"d_model": 0}, "d_model"),
    ]:
        with pytest.raises(ValueError, match=match):
            T5Config.from_transformers_config(bad)


# ---------------------------------------------------------------------------- prompts


def test_prepare_prompts_templates():
    # utils/common.py `preprocess_text`: fps, then noise level, then aspect ratio
    assert prepare_prompts(["a cat"]) == ["a cat"]
    assert prepare_prompts(["a cat", ""], aspect_ratio="16:9", fps=8, noise_std=0.3) == [
        "Noise Level 300:\nA video with 8 fps:\na cat\n\n in a 16:9 aspect ratio.\n",
        "Noise Level 300:\nA video with 8 fps:\n\n\n in a 16:9 aspect ratio.\n",
    ]
    assert prepare_prompts(["a", "b"], fps=[0, 24]) == ["An image:\na\n", "A video with 24 fps:\nb\n"]
    assert prepare_prompts(["a"], noise_std=0.07) == ["Noise Level 70:\na"]
    assert prepare_prompts(["a", "b"], noise_std=np.array([0.3, 0.5], np.float32)) == [
        "Noise Level 300:\na",
        "Noise Level 500:\nb",
    ]
    assert prepare_prompts(["a dog"], aspect_ratio="1:1") == ["a dog\n in a 1:1 aspect ratio.\n"]
    assert prepare_prompts(["x"], fps=8, use_template=True) == [
        "<start_of_turn>user\nPlease generate a video about: A video with 8 fps:\nx\n<end_of_turn>\n"
        "<start_of_turn>model\n"
    ]
    with pytest.raises(ValueError, match="3 values for 2 prompts"):
        prepare_prompts(["a", "b"], fps=[1, 2, 3])
    with pytest.raises(ValueError, match="single string"):
        prepare_prompts("a cat")


@pytest.mark.skipif(not REFERENCE_REPO, reason="STARFLOW_REFERENCE_REPO is unset: no apple/ml-starflow checkout")
def test_prepare_prompts_equals_reference_function():
    """``preprocess_text`` taken from the reference source (without importing its heavy module)."""
    source = Path(REFERENCE_REPO, "utils", "common.py").read_text()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "preprocess_text")
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "preprocess_text", "exec"), namespace)
    ref = namespace["preprocess_text"]
    prompts = ["a red fox", "", "two cats\non a sofa"]
    for kw in [
        {},
        dict(aspect_ratio="9:16"),
        dict(fps=16),
        dict(fps=0),
        dict(noise_std=0.3),
        dict(noise_std=0.125, aspect_ratio="4:5", fps=24),
        dict(fps=torch.tensor([0, 8, 30])),
        dict(noise_std=torch.tensor([0.3, 0.7, 0.01])),
    ]:
        ours = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        assert prepare_prompts(prompts, **ours) == ref(prompts, **kw), kw
        assert prepare_prompts(prompts, use_template=True, **ours) == ref(prompts, use_template=True, **kw), kw


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from conftest import make_t5_tokenizer

    return make_t5_tokenizer(tmp_path_factory.mktemp("t5_tokenizer"))


def test_encode_prompts_end_to_end(tokenizer_dir):
    model = hf_encoder(seed=3)
    encoder = t5_from_transformers(model.state_dict(), model.config)
    tokenizer = load_tokenizer(tokenizer_dir)
    txt_size = 64
    prompts = ["a red cat", "", "the dog in the video " * 10]  # the last one is truncated
    kw = dict(aspect_ratio="16:9", fps=8, noise_std=0.3)
    y = np.asarray(encode_prompts(encoder, tokenizer, prompts, txt_size, **kw))
    assert y.shape == (3, txt_size, 64) and y.dtype == np.float32

    # the reference's calls, on the same template strings, with transformers' encoder
    texts = ["Noise Level 300:\nA video with 8 fps:\n" + p + "\n\n in a 16:9 aspect ratio.\n" for p in prompts]
    ref_tok = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt", max_length=txt_size)
    ids, mask = tokenize(tokenizer, prepare_prompts(prompts, **kw), txt_size)
    np.testing.assert_array_equal(ids, ref_tok["input_ids"].numpy())
    np.testing.assert_array_equal(mask, ref_tok["attention_mask"].numpy())
    assert mask[2].all() and ids[2, -1] == tokenizer.eos_token_id  # truncated, ends with </s>
    assert 0 < mask[0].sum() < txt_size
    with torch.no_grad():
        want = model(**ref_tok).last_hidden_state * ref_tok["attention_mask"].unsqueeze(-1)
    want = want.numpy()
    assert np.all(y[mask == 0] == 0) and np.all(np.abs(y[mask == 1]).sum(-1) > 0)
    err = rel_err(y, want)

    null = np.asarray(null_embedding(encoder, tokenizer, txt_size, batch_size=2, **kw))
    np.testing.assert_allclose(null[0], y[1], rtol=1e-5, atol=1e-6)  # "" through the same templates
    np.testing.assert_array_equal(null[0], null[1])
    plain_null = np.asarray(null_embedding(encoder, tokenizer, txt_size))
    null_ids, null_mask = tokenize(tokenizer, [""], txt_size)
    assert null_ids[0, 0] == tokenizer.eos_token_id and null_mask.sum() == 1  # just </s>
    err_null = rel_err(plain_null, hf_hidden(model, null_ids, null_mask) * null_mask[..., None])
    print(
        f"\nencode_prompts vs transformers (templates, txt_size {txt_size}): rel err {err:.2e}; "
        f"null caption {err_null:.2e}"
    )
    assert err < TOL and err_null < TOL


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "weights_only")
