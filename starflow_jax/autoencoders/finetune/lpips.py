"""LPIPS (VGG16) as the reference's ``misc/lpips.py`` computes it, in Flax NNX.

Images ``(b, c, h, w)`` in [0, 1] (the reference's convention; LPIPS itself wants [-1, 1],
so they are mapped by ``2 x - 1``), then:

    x -> (x - SHIFT) / SCALE                      the lpips ScalingLayer
    VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    each unit-normalised over channels: f / (sqrt(sum f^2) + 1e-10)
    d_k = (f_k(x) - f_k(y))^2, a 1x1 convolution without bias (lin_k) to one channel,
    averaged over the pixels; the distance is the sum over the five layers

Per-image distances ``(b,)`` out. No dropout (the reference runs the heads in eval mode).

Weights: torchvision's VGG16 state dict (``features.<i>.weight/bias``, e.g.
``vgg16-397923af.pth``; its ``classifier.*`` is ignored) and the lpips package's linear
heads (``vgg.pth``: ``lin<k>.model.1.weight`` of shape ``(1, C_k, 1, 1)``): ``load_lpips``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.autoencoders.finetune.weights import CONV, SAME, module_from_state_dict, read_state_dict

__all__ = [
    "HEAD_FILE_NAME",
    "LPIPS",
    "SCALING_SCALE",
    "SCALING_SHIFT",
    "VGG16_FILE_NAME",
    "load_lpips",
    "torch_name",
    "unit_normalize",
]

SCALING_SHIFT = (-0.030, -0.088, -0.188)
SCALING_SCALE = (0.458, 0.448, 0.450)
VGG16_FILE_NAME = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16
HEAD_FILE_NAME = "vgg.pth"  # the lpips package's linear heads (lpips/weights/v0.1/vgg.pth)
# VGG16's convolutions: (out channels, index in torchvision's `features`), one list per stage;
# a 2x2 max pool before every stage but the first, the distance read after each stage's last ReLU
VGG16_STAGES = (
    ((64, 0), (64, 2)),
    ((128, 5), (128, 7)),
    ((256, 10), (256, 12), (256, 14)),
    ((512, 17), (512, 19), (512, 21)),
    ((512, 24), (512, 26), (512, 28)),
)
_EPS = 1e-10


def unit_normalize(features: jax.Array) -> jax.Array:
    """``f / (sqrt(sum_c f^2) + 1e-10)`` over the last axis; the gradient stays finite
    where a feature vector is all zeros (the square root's is not there)."""
    squared = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
    positive = squared > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    return features / (norm + _EPS)


class LPIPS(nnx.Module):
    """Frozen LPIPS-VGG16: ``lpips(x, y)`` of images ``(b, 3, h, w)`` in [0, 1] -> ``(b,)``.
    ``precision``: the convolutions' (None: the platform's default, bfloat16 passes on TPU;
    ``jax.lax.Precision.HIGHEST``: float32, as the reference computes its losses)."""

    def __init__(self, *, precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
        self.convs = nnx.List()
        in_channels = 3
        for stage in VGG16_STAGES:
            for out_channels, _ in stage:
                self.convs.append(
                    nnx.Conv(in_channels, out_channels, (3, 3), padding=1, precision=precision, rngs=rngs)
                )
                in_channels = out_channels
        self.heads = nnx.List(
            [
                nnx.Conv(stage[-1][0], 1, (1, 1), use_bias=False, precision=precision, rngs=rngs)
                for stage in VGG16_STAGES
            ]
        )

    def features(self, images: jax.Array) -> list[jax.Array]:
        """The five VGG16 activations ``(b, h_k, w_k, C_k)`` of ``images`` ``(b, h, w, 3)``
        already scaled (``ScalingLayer``)."""
        outputs, h, i = [], images, 0
        for k, stage in enumerate(VGG16_STAGES):
            if k:
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            for _ in stage:
                h = jax.nn.relu(self.convs[i](h))
                i += 1
            outputs.append(h)
        return outputs

    def __call__(self, images: jax.Array, targets: jax.Array) -> jax.Array:
        if images.shape != targets.shape or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"LPIPS takes two (b, 3, h, w) image batches of one shape, got {tuple(images.shape)} "
                f"and {tuple(targets.shape)}"
            )
        shift = jnp.asarray(SCALING_SHIFT, jnp.float32)
        scale = jnp.asarray(SCALING_SCALE, jnp.float32)
        both = jnp.concatenate([images, targets]).astype(jnp.float32)
        both = (jnp.transpose(both, (0, 2, 3, 1)) * 2.0 - 1.0 - shift) / scale
        distance = jnp.zeros((images.shape[0],), jnp.float32)
        for feats, head in zip(self.features(both), self.heads):
            a, b = jnp.split(unit_normalize(feats), 2)
            distance = distance + head(jnp.square(a - b)).mean(axis=(1, 2, 3))
        return distance


def torch_name(path: tuple[str, ...]) -> tuple[str, object]:
    """torchvision's (``features.<i>``) or lpips' (``lin<k>.model.1``) name of one of ours."""
    group, index, leaf = path
    if group == "heads":
        return f"lin{index}.model.1.weight", CONV
    conv_index = [i for stage in VGG16_STAGES for _, i in stage][int(index)]
    return f"features.{conv_index}.{'weight' if leaf == 'kernel' else 'bias'}", CONV if leaf == "kernel" else SAME


def load_lpips(vgg16_weights, head_weights, *, precision: jax.lax.PrecisionLike = None) -> LPIPS:
    """LPIPS from torchvision's VGG16 state dict (``vgg16_weights``: ``vgg16-397923af.pth``
    or a mapping; only ``features.*`` is read) and the lpips linear heads (``head_weights``:
    the lpips package's ``vgg.pth`` or a mapping; only ``lin<k>.*`` is read). A missing
    file is a ``FileNotFoundError``; a missing or mis-shaped tensor, a ``StateDictMismatch``
    (a ``ValueError``) naming it."""
    vgg = read_state_dict(vgg16_weights, f"torchvision's VGG16 ImageNet weights ({VGG16_FILE_NAME})")
    heads = read_state_dict(head_weights, f"the lpips package's VGG linear heads ({HEAD_FILE_NAME})")
    weights = {k: v for k, v in vgg.items() if k.startswith("features.")}
    weights.update({k: v for k, v in heads.items() if k.startswith("lin")})
    return module_from_state_dict(lambda: LPIPS(precision=precision, rngs=nnx.Rngs(0)), weights, torch_name)
