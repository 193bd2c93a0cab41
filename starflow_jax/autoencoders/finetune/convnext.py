"""torchvision's ConvNeXt-S in Flax NNX, and the perceptual term the reference's
``PerceptualLoss`` (``misc/ae_losses.py``, ``"convnext_s"``) computes with it.

The term: both image batches ``(b, 3, h, w)`` in [0, 1] resized to 224x224 (bilinear,
half-pixel centres, antialiased when shrinking: ``F.interpolate(size=224, mode="bilinear",
align_corners=False, antialias=True)``; the aspect ratio is not kept), normalised with
ImageNet's mean and std, run through the whole classifier; the distance is the mean squared
difference of the two batches' 1000 **logits** (``F.mse_loss``, mean over batch and
classes): ``convnext_distance``.

The network (``torchvision.models.convnext_small``): a 4x4 stride-4 stem and LayerNorm;
four stages of (3, 3, 27, 3) blocks of widths (96, 192, 384, 768), a LayerNorm and a 2x2
stride-2 convolution between stages; a block is ``x + gamma * fc2(GELU(fc1(LN(dwconv7x7(x)))))``
(exact GELU, LayerNorm eps 1e-6, stochastic depth off at evaluation); the head averages the
pixels, normalises and applies a Linear to 1000 classes. Weights from torchvision's state
dict (``convnext_small-0c510722.pth``): ``load_convnext``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.autoencoders.finetune.weights import CONV, LINEAR, SAME, module_from_state_dict, read_state_dict

__all__ = [
    "CONVNEXT_SMALL",
    "ConvNeXt",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT_SIZE",
    "WEIGHT_FILE_NAME",
    "convnext_distance",
    "load_convnext",
    "resize_antialiased",
    "torch_name",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
WEIGHT_FILE_NAME = "convnext_small-0c510722.pth"  # torchvision's ConvNeXt_Small_Weights.IMAGENET1K_V1
CONVNEXT_SMALL = dict(depths=(3, 3, 27, 3), widths=(96, 192, 384, 768), num_classes=1000)
_EPS = 1e-6


def _layer_norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=_EPS, use_fast_variance=False, rngs=rngs)


class ConvNeXtBlock(nnx.Module):
    def __init__(self, width: int, precision, rngs: nnx.Rngs):
        self.dwconv = nnx.Conv(
            width, width, (7, 7), padding=3, feature_group_count=width, precision=precision, rngs=rngs
        )
        self.norm = _layer_norm(width, rngs)
        self.fc1 = nnx.Linear(width, 4 * width, precision=precision, rngs=rngs)
        self.fc2 = nnx.Linear(4 * width, width, precision=precision, rngs=rngs)
        self.layer_scale = nnx.Param(jnp.full((1, 1, width), 1e-6, jnp.float32))  # torchvision's init

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc2(jax.nn.gelu(self.fc1(self.norm(self.dwconv(x))), approximate=False))
        return x + self.layer_scale[...] * h


class ConvNeXt(nnx.Module):
    """torchvision's ConvNeXt classifier: images ``(b, h, w, 3)`` (normalised) -> logits.
    ``precision``: the convolutions' and matmuls' (None: the platform's default, bfloat16
    passes on TPU; ``jax.lax.Precision.HIGHEST``: float32, as the reference computes its losses)."""

    def __init__(
        self,
        depths=CONVNEXT_SMALL["depths"],
        widths=CONVNEXT_SMALL["widths"],
        num_classes: int = CONVNEXT_SMALL["num_classes"],
        *,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        if len(depths) != len(widths):
            raise ValueError(f"one depth per stage width: depths {depths}, widths {widths}")
        self.stem_conv = nnx.Conv(3, widths[0], (4, 4), strides=4, padding="VALID", precision=precision, rngs=rngs)
        self.stem_norm = _layer_norm(widths[0], rngs)
        self.down_norms = nnx.List([_layer_norm(w, rngs) for w in widths[:-1]])
        self.down_convs = nnx.List(
            [
                nnx.Conv(a, b, (2, 2), strides=2, padding="VALID", precision=precision, rngs=rngs)
                for a, b in zip(widths[:-1], widths[1:])
            ]
        )
        self.stages = nnx.List(
            [nnx.List([ConvNeXtBlock(w, precision, rngs) for _ in range(d)]) for d, w in zip(depths, widths)]
        )
        self.head_norm = _layer_norm(widths[-1], rngs)
        self.head = nnx.Linear(widths[-1], num_classes, precision=precision, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        h = self.stem_norm(self.stem_conv(images))
        for k, stage in enumerate(self.stages):
            if k:
                h = self.down_convs[k - 1](self.down_norms[k - 1](h))
            for block in stage:
                h = block(h)
        return self.head(self.head_norm(h.mean(axis=(1, 2))))


@functools.partial(jax.jit, static_argnames="size")
def resize_antialiased(images: jax.Array, size: int) -> jax.Array:
    """``images`` ``(b, h, w, c)`` to ``(b, size, size, c)`` like torch's
    ``interpolate(mode="bilinear", align_corners=False, antialias=True)``: a triangle filter,
    widened by the shrink factor when shrinking, renormalised at the borders."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method="linear", antialias=True)


def convnext_distance(net: ConvNeXt, images: jax.Array, targets: jax.Array) -> jax.Array:
    """The reference's ConvNeXt-S perceptual term of two ``(b, 3, h, w)`` batches in [0, 1]:
    the mean squared difference of their logits after the 224x224 resize and ImageNet
    normalisation (a scalar)."""
    if images.shape != targets.shape or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"the ConvNeXt term takes two (b, 3, h, w) image batches of one shape, got {tuple(images.shape)} "
            f"and {tuple(targets.shape)}"
        )
    both = jnp.transpose(jnp.concatenate([images, targets]).astype(jnp.float32), (0, 2, 3, 1))
    both = resize_antialiased(both, INPUT_SIZE)
    both = (both - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    a, b = jnp.split(net(both), 2)
    return jnp.mean(jnp.square(a - b))


_NORM = {"scale": "weight", "bias": "bias"}
_BLOCK = {"dwconv": "block.0", "norm": "block.2", "fc1": "block.3", "fc2": "block.5"}


def torch_name(path: tuple[str, ...]) -> tuple[str, object]:
    """torchvision's ``convnext_*`` state-dict name of one of our parameters, and its layout."""
    head, leaf = path[0], path[-1]
    kernel = leaf == "kernel"
    conv_leaf = ("weight", CONV) if kernel else ("bias", SAME)
    if head == "stem_conv":
        name, layout = "features.0.0", conv_leaf
    elif head == "stem_norm":
        return f"features.0.1.{_NORM[leaf]}", SAME
    elif head in ("down_norms", "down_convs"):  # features.(2k) = (LayerNorm2d, Conv2d), k = 1, 2, 3
        stage = 2 * (int(path[1]) + 1)
        if head == "down_norms":
            return f"features.{stage}.0.{_NORM[leaf]}", SAME
        name, layout = f"features.{stage}.1", conv_leaf
    elif head == "head_norm":
        return f"classifier.0.{_NORM[leaf]}", SAME
    elif head == "head":
        name, layout = "classifier.2", (("weight", LINEAR) if kernel else ("bias", SAME))
    else:  # stages.k.j.<part> -> features.(2k + 1).j.block.<n>
        block = f"features.{2 * int(path[1]) + 1}.{path[2]}"
        if path[3] == "layer_scale":
            return f"{block}.layer_scale", (1, 2, 0)  # torch (C, 1, 1) -> ours (1, 1, C)
        part = path[3]
        name = f"{block}.{_BLOCK[part]}"
        if part == "norm":
            return f"{name}.{_NORM[leaf]}", SAME
        layout = ("weight", LINEAR if part.startswith("fc") else CONV) if kernel else ("bias", SAME)
    return f"{name}.{layout[0]}", layout[1]


def load_convnext(path_or_state_dict, *, precision: jax.lax.PrecisionLike = None, **architecture) -> ConvNeXt:
    """A ``ConvNeXt`` (ConvNeXt-S unless ``architecture`` says otherwise) holding
    torchvision's state dict: ``convnext_small-0c510722.pth`` or a mapping. A missing file is
    a ``FileNotFoundError``; a missing, unexpected or mis-shaped tensor, one
    ``StateDictMismatch`` (a ``ValueError``) naming them."""
    state_dict = read_state_dict(path_or_state_dict, f"torchvision's ConvNeXt-S ImageNet weights ({WEIGHT_FILE_NAME})")
    return module_from_state_dict(
        lambda: ConvNeXt(**architecture, precision=precision, rngs=nnx.Rngs(0)), state_dict, torch_name
    )
