"""CLIP score as torchmetrics computes it, with CLIP's image and text towers in Flax NNX.

The towers are transformers' ``CLIPModel`` (``get_image_features`` / ``get_text_features``),
loaded from a Hugging Face checkpoint directory the user already has (``config.json`` plus
``model.safetensors``, its sharded index, or ``pytorch_model.bin``; torchmetrics' default
is ``openai/clip-vit-large-patch14``). Nothing is downloaded.

What is exact (up to float32 rounding) and what is not:

* ``CLIPModel.image_features(pixel_values)`` and ``text_features(input_ids)``: the same
  computation as transformers' (pre-norm encoder layers, ``hidden_act`` of the config,
  class token through ``post_layernorm``, text pooled at the end-of-text token by the
  rule of the config's ``eos_token_id``, projections without bias).
* ``preprocess_images``: CLIP's image processor with its PIL backend
  (``CLIPImageProcessorPil``; transformers' slow ``CLIPImageProcessor``) for ``uint8``
  images: PIL's bicubic resize of the shorter side (reproduced bit for bit, antialiasing
  included, see ``resize_bicubic_like_pil``), center crop, ``/ 255``, CLIP mean and std.
  transformers' torchvision backend (the "fast" processor, the default of transformers 5
  when torchvision is installed) resizes with torch's antialiased bicubic instead, which
  may differ from PIL by one grey level on some pixels.
* ``tokenize``: transformers' ``CLIPTokenizer`` of the same directory, padded to the
  longest prompt and cut to the text tower's positions as torchmetrics does.
* ``clip_score``: torchmetrics' ``clip_score`` / ``CLIPScore``: ``max(mean_i 100 *
  cos(image_i, text_i), 0)`` -- the clamp at 0 applies to the mean, not to each pair.

Our module paths are transformers' state-dict names (``vision_model.pre_layrnorm`` keeps
its spelling); dense kernels are ``(in, out)`` (torch ``(out, in)``), the patch
convolution HWIO (torch OIHW), layer norms ``scale`` for ``weight``, embeddings
``embedding`` for ``weight``. Images are NHWC (torch: NCHW).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.autoencoders.convert_vae import fill_named_state, read_weights

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "WEIGHT_FILE_NAMES",
    "TowerConfig",
    "CLIPConfig",
    "CLIPModel",
    "clip_config",
    "load_clip",
    "resize_bicubic_like_pil",
    "preprocess_images",
    "tokenize",
    "clip_scores",
    "clip_score",
    "torch_name",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILE_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_HIGHEST = jax.lax.Precision.HIGHEST

# transformers' ACT2FN entries that CLIP checkpoints use
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One transformer tower; the text tower uses ``vocab_size``, ``max_position_embeddings``
    and ``eos_token_id``, the vision tower ``image_size``, ``patch_size``, ``num_channels``."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    vocab_size: int = 0
    max_position_embeddings: int = 0
    eos_token_id: int = 0
    image_size: int = 0
    patch_size: int = 0
    num_channels: int = 3


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: TowerConfig
    vision: TowerConfig
    projection_dim: int


# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for keys a config.json omits
_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def _square(v, what: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"CLIP vision {what} must be square, got {v}")
        v = v[0]
    return int(v)


def clip_config(config: Mapping[str, Any]) -> CLIPConfig:
    """Our configuration from a transformers ``CLIPConfig`` dict (a ``config.json``)."""
    text = {**_TEXT_DEFAULTS, **{k: v for k, v in (config.get("text_config") or {}).items() if k in _TEXT_DEFAULTS}}
    vision = {
        **_VISION_DEFAULTS,
        **{k: v for k, v in (config.get("vision_config") or {}).items() if k in _VISION_DEFAULTS},
    }
    for tower in (text, vision):
        if tower["hidden_act"] not in _ACTIVATIONS:
            raise ValueError(
                f"CLIP hidden_act {tower['hidden_act']!r} is not supported (one of {sorted(_ACTIVATIONS)})"
            )
    if not isinstance(text["eos_token_id"], int):
        raise ValueError(f"CLIP text eos_token_id must be one integer, got {text['eos_token_id']!r}")
    vision["image_size"] = _square(vision["image_size"], "image_size")
    vision["patch_size"] = _square(vision["patch_size"], "patch_size")
    return CLIPConfig(TowerConfig(**text), TowerConfig(**vision), int(config.get("projection_dim", 512)))


# ---------------------------------------------------------------------------------------------
# Model


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # two-pass variance (torch's): the fast E[x^2] - E[x]^2 loses digits on CLIP's large activations
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=use_bias, precision=_HIGHEST, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention, softmax(q k^T / sqrt(head_dim)) v, optionally causal."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.q_proj, self.k_proj = _linear(dim, dim, rngs), _linear(dim, dim, rngs)
        self.v_proj, self.out_proj = _linear(dim, dim, rngs), _linear(dim, dim, rngs)

    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        b, n, d = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, d // self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, precision=_HIGHEST) * (d // self.heads) ** -0.5
        if causal:  # position i sees positions <= i (never an empty row: the diagonal is kept)
            logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhc->bqhc", weights, v, precision=_HIGHEST)
        return self.out_proj(out.reshape(b, n, d))


class MLP(nnx.Module):
    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.fc1 = _linear(cfg.hidden_size, cfg.intermediate_size, rngs)
        self.fc2 = _linear(cfg.intermediate_size, cfg.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-norm residual block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
        for layer in self.layers:
            x = layer(x, causal)
        return x


class TextEmbeddings(nnx.Module):
    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        n = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.embedding[...][:n]


class CLIPTextTransformer(nnx.Module):
    """Token + position embeddings, causal encoder, final layer norm, the state at the
    end-of-text token. That token is found as transformers does: for ``eos_token_id == 2``
    (configs written before transformers PR #24773, among them OpenAI's) the position of
    the largest token id (the first one on ties: CLIP's end-of-text is the largest id of its
    vocabulary), otherwise the first position holding ``eos_token_id``."""

    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.max_positions = cfg.max_position_embeddings
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = TextEmbeddings(cfg, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.final_layer_norm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.max_positions:
            raise ValueError(
                f"input_ids must be (batch, length <= {self.max_positions}), got shape {tuple(input_ids.shape)}"
            )
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids), causal=True))
        legacy = self.eos_token_id == 2
        pooled_at = jnp.argmax(input_ids if legacy else (input_ids == self.eos_token_id), axis=-1)
        return x[jnp.arange(x.shape[0]), pooled_at]


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.hidden_size
        self.class_embedding = nnx.Param(jnp.zeros((d,)))
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, d, (p, p), strides=(p, p), padding="VALID", use_bias=False, precision=_HIGHEST, rngs=rngs
        )
        self.position_embedding = nnx.Embed((cfg.image_size // p) ** 2 + 1, d, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        patches = self.patch_embedding(pixel_values)  # (batch, grid, grid, hidden), row-major as torch flattens
        b, d = patches.shape[0], patches.shape[-1]
        tokens = jnp.concatenate([jnp.broadcast_to(self.class_embedding[...], (b, 1, d)), patches.reshape(b, -1, d)], 1)
        return tokens + self.position_embedding.embedding[...]


class CLIPVisionTransformer(nnx.Module):
    """Patch embedding + class token + positions, pre-layernorm, encoder, post-layernorm of
    the class token. Input: normalized ``(batch, image_size, image_size, channels)``."""

    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.image_size = cfg.image_size
        self.embeddings = VisionEmbeddings(cfg, rngs=rngs)
        self.pre_layrnorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.post_layernorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        if pixel_values.ndim != 4 or pixel_values.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values must be (batch, {self.image_size}, {self.image_size}, channels) (NHWC, as "
                f"preprocess_images gives), got shape {tuple(pixel_values.shape)}"
            )
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return self.post_layernorm(x[:, 0])


class CLIPModel(nnx.Module):
    """transformers' ``CLIPModel`` at inference: ``image_features`` / ``text_features`` are
    its ``get_image_features`` / ``get_text_features`` (projected, not normalized)."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg.text, rngs=rngs)
        self.vision_model = CLIPVisionTransformer(cfg.vision, rngs=rngs)
        self.text_projection = _linear(cfg.text.hidden_size, cfg.projection_dim, rngs, use_bias=False)
        self.visual_projection = _linear(cfg.vision.hidden_size, cfg.projection_dim, rngs, use_bias=False)
        self.logit_scale = nnx.Param(jnp.asarray(2.6592, jnp.float32))  # kept: log of the contrastive temperature

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixel_values))

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        """Padding after the end-of-text token does not change the result (the attention is
        causal), so no attention mask is taken."""
        return self.text_projection(self.text_model(jnp.asarray(input_ids, jnp.int32)))


# ---------------------------------------------------------------------------------------------
# Weights

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_name(path: tuple) -> str:
    """The transformers state-dict name of one of our parameters."""
    parts = [str(p) for p in path]
    return ".".join(parts[:-1] + [_LEAF_NAMES.get(parts[-1], parts[-1])])


def _names_of(path: tuple, shape: tuple):
    transpose = False
    if path[-1] == "kernel":
        transpose = (2, 3, 1, 0) if len(shape) == 4 else True  # OIHW -> HWIO, (out, in) -> (in, out)
    return [(torch_name(path), None, transpose)]


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CLIP checkpoint directory {directory!r} has no config.json; expected a transformers CLIPModel "
            f"directory (config.json + one of {WEIGHT_FILE_NAMES}), e.g. a local copy of "
            "openai/clip-vit-large-patch14"
        )
    with open(path) as f:
        return json.load(f)


def load_clip(directory: str | os.PathLike) -> CLIPModel:
    """A ``CLIPModel`` holding the weights of a transformers CLIP checkpoint directory.

    Reads ``config.json`` and the first of ``WEIGHT_FILE_NAMES`` present (``.bin`` needs
    torch). The ``position_ids`` buffers older checkpoints carry are ignored; any other
    missing, unexpected, mis-shaped or non-finite tensor raises one ``StateDictMismatch``
    naming them all."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"CLIP checkpoint directory {directory!r} does not exist; expected a transformers CLIPModel "
            f"directory (config.json + one of {WEIGHT_FILE_NAMES}), e.g. a local copy of openai/clip-vit-large-patch14"
        )
    cfg = clip_config(_read_config(directory))
    weights = next(
        (os.path.join(directory, n) for n in WEIGHT_FILE_NAMES if os.path.isfile(os.path.join(directory, n))), None
    )
    if weights is None:
        raise FileNotFoundError(
            f"CLIP checkpoint directory {directory!r} has no weights: expected one of {WEIGHT_FILE_NAMES} "
            f"(found: {sorted(os.listdir(directory))})"
        )
    state_dict = {k: v for k, v in read_weights(weights).items() if not k.endswith("position_ids")}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, fill_named_state(state, state_dict, _names_of))


# ---------------------------------------------------------------------------------------------
# Inputs

_PIL_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point coefficients for 8-bit images (Resample.c)


def _pil_cubic(x: float) -> float:
    """PIL's bicubic kernel (Keys, a = -0.5), with its operation order."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` int64 weights of one resize pass, as PIL's ``precompute_coeffs``
    and ``normalize_coeffs_8bpc`` make them (support widened by the downscale factor: the
    antialiasing; weights normalized in double, then rounded to 22-bit fixed point)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    inverse = 1.0 / filterscale
    out = np.zeros((out_size, in_size), np.int64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # int() truncates towards zero, as C's cast
        hi = min(int(center + support + 0.5), in_size)
        w = [_pil_cubic((x - center + 0.5) * inverse) for x in range(lo, hi)]
        total = 0.0
        for v in w:  # summed in order, as PIL does
            total += v
        for x, v in zip(range(lo, hi), w):
            v = v / total if total != 0.0 else v
            out[i, x] = int(v * (1 << _PIL_PRECISION_BITS) + (0.5 if v >= 0 else -0.5))
    return out


def _pil_pass(images: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """One PIL resize pass along ``axis`` of uint8 images: fixed-point sums, rounded and clipped to 8 bits."""
    acc = np.moveaxis(np.tensordot(matrix, images.astype(np.int64), axes=([1], [axis])), 0, axis)
    return np.clip((acc + (1 << (_PIL_PRECISION_BITS - 1))) >> _PIL_PRECISION_BITS, 0, 255).astype(np.uint8)


def resize_bicubic_like_pil(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``(batch, height, width, channels)`` resized to ``size`` = ``(height, width)``
    exactly as ``PIL.Image.resize(..., Image.BICUBIC)`` resizes an 8-bit image: a horizontal
    then a vertical pass, each rounded to uint8, a pass skipped where the size is kept."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (batch, height, width, channels), got {images.dtype} {images.shape}")
    if images.shape[2] != size[1]:
        images = _pil_pass(images, _pil_bicubic_matrix(images.shape[2], size[1]), axis=2)
    if images.shape[1] != size[0]:
        images = _pil_pass(images, _pil_bicubic_matrix(images.shape[1], size[0]), axis=1)
    return images


def preprocess_images(
    images: np.ndarray,
    image_size: int,
    crop_size: int | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """uint8 RGB ``(batch, height, width, 3)`` to the CLIP vision tower's float32 NHWC input,
    as CLIP's image processor (PIL backend) does: the shorter side resized to ``image_size``
    (the longer to ``int(image_size * long / short)``) with PIL's bicubic, a center crop of
    ``crop_size`` (default ``image_size``; top-left corner ``(size - crop) // 2``), ``/ 255``,
    ``(x - mean) / std``. OpenAI's checkpoints use ``image_size = crop_size`` = the vision
    tower's ``image_size`` (``model.config.vision.image_size``) and CLIP's mean and std."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (batch, height, width, 3), got {images.dtype} {images.shape}")
    crop = image_size if crop_size is None else crop_size
    h, w = images.shape[1:3]
    short, long = min(h, w), max(h, w)
    new_long = int(image_size * long / short)
    size = (image_size, new_long) if h <= w else (new_long, image_size)
    if crop > min(size):
        raise ValueError(f"crop_size {crop} exceeds the resized image {size}")
    images = resize_bicubic_like_pil(images, size)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    images = images[:, top : top + crop, left : left + crop].astype(np.float32) * np.float32(1 / 255)
    return (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def tokenize(directory: str | os.PathLike, prompts: Sequence[str], max_length: int | None = None) -> np.ndarray:
    """int32 ``(len(prompts), length)`` token ids of ``prompts`` by transformers'
    ``CLIPTokenizer`` of the checkpoint ``directory``, as torchmetrics makes them: padded to
    the longest prompt, then cut to ``max_length`` tokens (default: the text tower's
    ``max_position_embeddings``) with a warning -- a cut prompt loses its end-of-text token,
    as in torchmetrics."""
    try:
        from transformers import CLIPTokenizer
    except ImportError as e:
        raise ImportError(
            "tokenizing prompts for the CLIP score needs transformers (pip install 'starflow-jax[text]'), "
            "or pass token ids made elsewhere"
        ) from e
    directory = os.fspath(directory)
    if max_length is None:
        max_length = clip_config(_read_config(directory)).text.max_position_embeddings
    ids = np.asarray(CLIPTokenizer.from_pretrained(directory)(list(prompts), padding=True)["input_ids"], np.int32)
    if ids.shape[1] > max_length:
        warnings.warn(
            f"prompts longer than {max_length} tokens are cut to {max_length} (as torchmetrics does)", stacklevel=2
        )
        ids = ids[:, :max_length]
    return ids


# ---------------------------------------------------------------------------------------------
# Score


def clip_scores(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """Per pair ``100 * cos(image_i, text_i)``, float32, not clamped (torchmetrics'
    ``_clip_score_update``: each embedding divided by its L2 norm, no epsilon)."""
    image_embeds = jnp.asarray(image_embeds, jnp.float32)
    text_embeds = jnp.asarray(text_embeds, jnp.float32)
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(f"expected two (n, dim) arrays of one shape, got {image_embeds.shape} and {text_embeds.shape}")
    image_embeds = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    text_embeds = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return 100 * jnp.sum(image_embeds * text_embeds, axis=-1)


def clip_score(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """torchmetrics' CLIP score: ``max(mean_i 100 * cos(image_i, text_i), 0)`` -- its
    functional ``clip_score`` and ``CLIPScore.compute`` clamp the mean, not each pair (over
    many batches: sum ``clip_scores``, divide by the count, then clamp)."""
    return jnp.maximum(jnp.mean(clip_scores(image_embeds, text_embeds)), 0.0)
