"""The CLIP towers, preprocessing and score of ``starflow_jax.evaluate.clip`` against
transformers' ``CLIPModel`` / ``CLIPImageProcessorPil`` / PIL and torchmetrics' ``clip_score``,
on tiny random checkpoints written by ``save_pretrained``."""

import importlib
import importlib.util
import json
import shutil
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from starflow_jax.evaluate import clip
from starflow_jax.interop.named_tensors import StateDictMismatch

VOCAB = 100


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _tiny_checkpoint(directory, eos_token_id: int, seed: int = 0):
    """A random transformers CLIPModel saved to ``directory``; every parameter perturbed so
    that layer norms, biases and the class token are not at their initial values."""
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            hidden_act="gelu",  # the vision tower keeps quick_gelu: both activations are checked
            bos_token_id=0,
            pad_token_id=1,
            eos_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


# rows: padding after the end-of-text token (by itself, by 0, by ids larger than it), and
# ids larger than the end-of-text token before it
IDS = {
    2: [[0, 5, 40, 2, 2, 2, 2, 2], [0, 90, 3, 2, 1, 1, 1, 1], [0, 7, 8, 9, 10, 11, 2, 0], [0, 2, 99, 98, 1, 1, 1, 1]],
    50: [
        [0, 5, 40, 50, 50, 50, 50, 50],
        [0, 90, 3, 50, 1, 1, 1, 1],
        [0, 7, 8, 9, 10, 11, 50, 0],
        [0, 50, 99, 98, 1, 1, 1, 1],
    ],
}


@pytest.mark.parametrize("eos", [2, 50], ids=["legacy_eos_2_argmax", "eos_50_first_position"])
def test_features_match_transformers(tmp_path, eos):
    model = _tiny_checkpoint(tmp_path, eos)
    ours = clip.load_clip(tmp_path)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor(IDS[eos])
    with torch.no_grad():
        want_image = model.get_image_features(pixel_values=pixels)
        want_text = model.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids))
    # transformers 5 returns a model output whose pooler_output is the projection, 4.x the tensor
    want_image = getattr(want_image, "pooler_output", want_image).numpy()
    want_text = getattr(want_text, "pooler_output", want_text).numpy()
    # under jit, as the evaluation runs them
    got_image = np.asarray(nnx.jit(lambda m, x: m.image_features(x))(ours, pixels.permute(0, 2, 3, 1).numpy()))
    got_text = np.asarray(nnx.jit(lambda m, x: m.text_features(x))(ours, ids.numpy()))
    rel_image, rel_text = _rel(got_image, want_image), _rel(got_text, want_text)
    print(f"eos={eos}: image features max rel err {rel_image:.2e}, text features max rel err {rel_text:.2e}")
    assert rel_image < 1e-4 and rel_text < 1e-4
    np.testing.assert_allclose(float(ours.logit_scale[...]), model.logit_scale.item(), rtol=1e-6)
    # the pooling rule matters for these rows: the other rule would pick another token
    assert np.any(np.argmax(ids.numpy(), -1) != np.argmax(ids.numpy() == eos, -1))


def _bare_package(name):
    """Register package ``name`` without running its ``__init__`` (torch-fidelity's imports
    torchvision, not installable beside the CPU torch here)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
        bare = types.ModuleType(name)
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = bare


def _torchmetrics_clip_score():
    _bare_package("torch_fidelity")  # before torchmetrics, whose __init__ imports torch-fidelity when present
    pytest.importorskip("torchmetrics", reason="torchmetrics not installed (pip install --no-deps torchmetrics)")
    try:
        return importlib.import_module("torchmetrics.functional.multimodal.clip_score").clip_score
    except (ImportError, AttributeError) as e:
        pytest.skip(f"torchmetrics' functional clip_score cannot be imported here: {e}")


class _Processor:
    """Stands in for torchmetrics' CLIPProcessor: images are already preprocessed, captions
    are keys of a table of token ids."""

    def __init__(self, ids: dict):
        self.ids = ids

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            return {"pixel_values": torch.stack(images)}
        ids = torch.tensor([self.ids[t] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _Model:
    """A CLIP model for torchmetrics whose features are tensors (transformers 5 returns a
    model output); ``None`` as the model: the features are looked up by their index."""

    def __init__(self, model=None, image_table=None, text_table=None):
        self.model, self.image_table, self.text_table = model, image_table, text_table
        self.config = types.SimpleNamespace()

    def to(self, device):
        return self

    def get_image_features(self, pixel_values):
        if self.model is None:
            return self.image_table[pixel_values.reshape(-1).long()]
        out = self.model.get_image_features(pixel_values=pixel_values)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, input_ids, attention_mask):
        if self.model is None:
            return self.text_table[input_ids[:, 0]]
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(out, "pooler_output", out)


@pytest.mark.parametrize("shift", [0.3, -3.0], ids=["mean_positive", "mean_negative"])
def test_clip_score_matches_torchmetrics_given_embeddings(shift):
    tm_clip_score = _torchmetrics_clip_score()
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 16)).astype(np.float32)
    text = (shift * image + rng.normal(size=(40, 16))).astype(np.float32)
    captions = [str(i) for i in range(40)]
    model = _Model(image_table=torch.from_numpy(image), text_table=torch.from_numpy(text))
    processor = _Processor({c: [i] for i, c in enumerate(captions)})
    images = [torch.full((1, 1, 1), float(i)) for i in range(40)]
    with torch.no_grad():
        want = float(tm_clip_score(images, captions, model_name_or_path=lambda: (model, processor)))
    got = float(clip.clip_score(image, text))
    pairs = np.asarray(clip.clip_scores(image, text))
    print(f"clip_score (shift {shift}): ours {got!r}, torchmetrics {want!r}")
    assert np.any(pairs < 0)  # some pairs are negative: clamping them one by one would differ
    if want == 0:
        assert got == 0
    else:
        print(f"clip_score given embeddings: max rel err {abs(got - want) / want:.2e}")
        assert abs(got - want) <= 1e-4 * want


def test_clip_score_end_to_end_matches_torchmetrics(tmp_path):
    """torchmetrics' clip_score over transformers' tiny model against ours over the loaded one."""
    tm_clip_score = _torchmetrics_clip_score()
    model = _tiny_checkpoint(tmp_path, eos_token_id=2, seed=3)
    ours = clip.load_clip(tmp_path)
    rng = np.random.default_rng(2)
    pixels = clip.preprocess_images(rng.integers(0, 256, (4, 40, 48, 3), dtype=np.uint8), 32)
    ids = np.asarray(IDS[2], np.int32)
    captions = [f"caption {i}" for i in range(4)]
    processor = _Processor(dict(zip(captions, ids.tolist())))
    images = list(torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))))
    with torch.no_grad():
        want = float(tm_clip_score(images, captions, model_name_or_path=lambda: (_Model(model), processor)))
    got = float(clip.clip_score(ours.image_features(jnp.asarray(pixels)), ours.text_features(ids)))
    print(f"clip_score end to end: ours {got!r}, torchmetrics {want!r}, max rel err {abs(got - want) / abs(want):.2e}")
    assert abs(got - want) <= 1e-4 * abs(want)


@pytest.mark.parametrize(
    "shape,size", [((2, 37, 53, 3), (24, 31)), ((1, 20, 30, 3), (45, 61)), ((2, 64, 64, 3), (32, 32))]
)
def test_resize_is_pils_bicubic(shape, size):
    image_module = pytest.importorskip("PIL.Image")
    images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    want = np.stack([np.asarray(image_module.fromarray(i).resize(size[::-1], image_module.BICUBIC)) for i in images])
    got = clip.resize_bicubic_like_pil(images, size)
    assert got.shape == want.shape and np.array_equal(got, want)


def test_preprocess_matches_clip_image_processor_pil():
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4: the slow processor is CLIPImageProcessor
        processor_class = transformers.CLIPImageProcessor
    processor = processor_class(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(5)
    for shape in [(2, 40, 56, 3), (2, 71, 45, 3), (1, 32, 32, 3)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        want = processor(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        got = clip.preprocess_images(images, 32)
        assert got.shape == want.shape
        print(f"preprocess {shape}: max abs err {np.max(np.abs(got - want)):.2e}")
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_tokenize_uses_the_directorys_tokenizer(tmp_path):
    letters = "abc"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 6}}))
    ids = clip.tokenize(tmp_path, ["ab", "a b"])
    assert ids.dtype == np.int32 and ids.tolist() == [[0, 2, 5, 1], [0, 3, 5, 1]]
    with pytest.warns(UserWarning, match="cut to 6"):
        assert clip.tokenize(tmp_path, ["a b c a b c"]).shape == (1, 6)


def test_pytorch_model_bin_with_position_ids(tmp_path):
    """A ``pytorch_model.bin`` (read by torch) holding the ``position_ids`` buffers of older checkpoints."""
    model = _tiny_checkpoint(tmp_path / "st", eos_token_id=2)
    state = dict(model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    from_bin, from_st = clip.load_clip(tmp_path / "bin"), clip.load_clip(tmp_path / "st")
    ids = np.asarray(IDS[2], np.int32)
    np.testing.assert_array_equal(np.asarray(from_bin.text_features(ids)), np.asarray(from_st.text_features(ids)))


def test_missing_directory_or_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip.load_clip(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        clip.load_clip(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        clip.load_clip(tmp_path)


def test_wrong_shape_names_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    _tiny_checkpoint(tmp_path / "good", eos_token_id=2)
    weights = load_file(str(tmp_path / "good" / "model.safetensors"))
    weights["text_projection.weight"] = weights["text_projection.weight"][:, :31]
    (tmp_path / "bad").mkdir()
    shutil.copy(tmp_path / "good" / "config.json", tmp_path / "bad" / "config.json")
    save_file(weights, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(StateDictMismatch, match=r"text_projection\.weight: got \(16, 31\), expected \(16, 32\)"):
        clip.load_clip(tmp_path / "bad")
