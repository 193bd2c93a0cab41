"""The FID Inception-v3 in Flax NNX: the 2015-12-05 TensorFlow graph as pytorch-fid
(``FIDInceptionA/C/E_1/E_2``) and torch-fidelity (``FeatureExtractorInceptionV3``) port it.

Images in: uint8 ``(batch, height, width, 3)`` of any size. They are resized to 299x299
with TensorFlow 1.x's bilinear resize (``align_corners=False``, no half-pixel offset:
output pixel ``i`` samples input ``i * in / out``; torch-fidelity's
``interpolate_bilinear_2d_like_tensorflow1x``), scaled by ``(x - 128) / 128`` and run
through the network. Out: the 2048-d pool features (FID), the 1008-way logits without
the final bias (``logits_unbiased``: what torch-fidelity and torchmetrics score IS on) and
with it (``logits``).

Weights: the users' own ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid) or
``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity), the same state dict.
Our module paths are its names (``Mixed_5b.branch1x1.conv.weight``, ...): convolution
kernels HWIO (torch OIHW), batch norms ``scale/bias/mean/var`` for
``weight/bias/running_mean/running_var``; ``num_batches_tracked`` is ignored.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.autoencoders.convert_vae import fill_named_state
from starflow_jax.interop.named_tensors import load_torch_file

__all__ = [
    "INPUT_SIZE",
    "WEIGHT_FILE_NAMES",
    "InceptionOutputs",
    "FIDInceptionV3",
    "resize_bilinear_like_tf1",
    "load_fid_inception",
    "torch_name",
]

INPUT_SIZE = 299
WEIGHT_FILE_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
_HIGHEST = jax.lax.Precision.HIGHEST


class InceptionOutputs(NamedTuple):
    pool: jax.Array  # (batch, 2048)
    logits_unbiased: jax.Array  # (batch, 1008), fc without its bias
    logits: jax.Array  # (batch, 1008)


def _tf1_sample_points(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Low and high source indices and the float32 weight of the high one, per output pixel."""
    position = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    low = position.astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, position - low.astype(np.float32)


def resize_bilinear_like_tf1(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``x`` float ``(batch, height, width, channels)`` resized to ``size`` as TF 1.x's bilinear
    resize without aligned corners does (torch-fidelity's exact, "slow" method)."""
    y_low, y_high, dy = _tf1_sample_points(x.shape[1], size[0])
    x_low, x_high, dx = _tf1_sample_points(x.shape[2], size[1])
    rows_low, rows_high = x[:, y_low], x[:, y_high]
    in_00, in_01 = rows_low[:, :, x_low], rows_low[:, :, x_high]
    in_10, in_11 = rows_high[:, :, x_low], rows_high[:, :, x_high]
    dx = jnp.asarray(dx)[None, None, :, None]
    dy = jnp.asarray(dy)[None, :, None, None]
    top = in_00 + (in_01 - in_00) * dx
    bottom = in_10 + (in_11 - in_10) * dx
    return top + (bottom - top) * dy


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def _avg_pool_3x3_valid_only(x: jax.Array) -> jax.Array:
    """3x3 average, stride 1, padding 1, dividing by the number of in-image pixels
    (``count_include_pad=False``: TensorFlow's average pool)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return total / count


class BasicConv2d(nnx.Module):
    """Convolution without bias, batch norm (eps 1e-3, running statistics), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, *, rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            _pair(kernel_size),
            strides=_pair(stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=_HIGHEST,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(out_channels, epsilon=1e-3, use_running_average=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_valid_only(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3d, _max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_3x3_valid_only(x))
        return jnp.concatenate([self.branch1x1(x), b7, b7d, bp], axis=-1)


class InceptionD(nnx.Module):
    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """``pool="avg"``: the first block (``Mixed_7b``, TF's average pool without padding);
    ``pool="max"``: the second (``Mixed_7c``, where the TF graph max-pools)."""

    def __init__(self, in_channels: int, pool: str, *, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = jnp.concatenate([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], axis=-1)
        pooled = _avg_pool_3x3_valid_only(x) if self.pool == "avg" else _max_pool(x, 1, padding=1)
        return jnp.concatenate([self.branch1x1(x), b3, b3d, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
    """The FID Inception-v3; call it on uint8 ``(batch, height, width, 3)`` images."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
        self.fc = nnx.Linear(2048, 1008, precision=_HIGHEST, rngs=rngs)

    def __call__(self, images: jax.Array) -> InceptionOutputs:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (batch, height, width, 3), got shape {images.shape}")
        if images.dtype != jnp.uint8:
            raise ValueError(f"images must be uint8 in [0, 255], got {images.dtype}")
        x = resize_bilinear_like_tf1(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool(x, 2)
        x = _max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        pool = x.mean(axis=(1, 2))
        unbiased = jnp.matmul(pool, self.fc.kernel[...], precision=_HIGHEST)
        return InceptionOutputs(pool, unbiased, unbiased + self.fc.bias[...])


_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_name(path: tuple) -> str:
    """The pytorch-fid / torch-fidelity state-dict name of one of our parameters."""
    parts = [str(p) for p in path]
    module, leaf = parts[:-1], parts[-1]
    if module and module[-1] == "bn":
        leaf = _BN_NAMES[leaf]
    elif leaf == "kernel":
        leaf = "weight"
    return ".".join(module + [leaf])


def _names_of(path: tuple, shape: tuple):
    transpose = False
    if path[-1] == "kernel":
        transpose = (2, 3, 1, 0) if len(shape) == 4 else True
    return [(torch_name(path), None, transpose)]


def load_fid_inception(path_or_state_dict) -> FIDInceptionV3:
    """The FID Inception-v3 holding the weights of ``path_or_state_dict``: a ``.pth`` file
    (one of ``WEIGHT_FILE_NAMES``; reading it needs torch) or a mapping of its names to
    arrays. A missing file, or a state dict that does not fit, is a clear error."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Inception weights {path} do not exist; expected pytorch-fid's {WEIGHT_FILE_NAMES[0]} "
                f"or torch-fidelity's {WEIGHT_FILE_NAMES[1]} (the same state dict)"
            )
        state_dict = load_torch_file(path)
    else:
        state_dict = path_or_state_dict
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    abstract = nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, fill_named_state(state, state_dict, _names_of))
