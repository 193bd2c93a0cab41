"""The patch discriminator of the reference's decoder fine-tuning (``NLayerDiscriminator``
of ``misc/discriminator.py`` as ``ReconstructionLoss_Single_Stage`` builds it for images:
no condition, blur resampling), in Flax NNX.

Images ``(b, c, h, w)`` (videos ``(b, t, c, h, w)`` are scored frame by frame, as the
reference's 2D discriminator does) in; logits ``(b, 1, 16, 16)`` out:

    conv 5x5 -> LeakyReLU(0.1)
    per stage i (channels 128 -> 128 -> 256 -> 512):
        conv 3x3 -> blur ([1, 3, 3, 1] outer product / 64, stride 2) -> GroupNorm(32) -> LeakyReLU(0.1)
    adaptive max pool to 16x16 -> conv 1x1 -> LeakyReLU(0.1) -> conv 5x5 to 1 channel

Every convolution has stride 1 and TensorFlow-style "same" padding (the extra pixel of an
even kernel on the bottom / right); the blur pads as a stride-2, size-4 window would,
whatever its kernel's length (the reference's ``BlurBlock``). Initialised as torch
initialises ``nn.Conv2d`` (the reference trains it from scratch). Weights from a torch
state dict of the reference's module: ``load_discriminator``.

``ClipDiscriminator``: the reference's ``NLayer3DDiscriminator`` (its ``--use_3d_disc 1``),
clips ``(b, t, c, h, w)`` scored whole: the same layout in 3D (5x5x5 / 3x3x3 / 1x1x1
convolutions), the blur spatial only (a ``1 x k x k`` kernel padded as a size-``k`` stride-2
window), its temporal stride 2 (frames 0, 2, 4, ...) in all but the first ``num_stages // 3``
stages, max pooled to ``(2, 16, 16)``: logits ``(b, 1, 2, 16, 16)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.autoencoders.finetune.weights import CONV, SAME, module_from_state_dict, read_state_dict
from starflow_jax.interop.named_tensors import StateDictMismatch
from starflow_jax.layers.linear import TORCH_KERNEL_INIT

__all__ = [
    "BLUR_KERNELS",
    "ClipDiscriminator",
    "LEAKY_SLOPE",
    "LOGITS_SIZE",
    "PatchDiscriminator",
    "adaptive_max_pool",
    "blur_downsample",
    "load_clip_discriminator",
    "load_discriminator",
    "torch_name",
]

BLUR_KERNELS = {3: (1, 2, 1), 4: (1, 3, 3, 1), 5: (1, 4, 6, 4, 1)}
LEAKY_SLOPE = 0.1
LOGITS_SIZE = (16, 16)
_GROUPS = 32


def _same_pad(kernel: int) -> tuple[int, int]:
    """Stride-1 "same" padding of a kernel: (before, after), the odd pixel after."""
    total = kernel - 1
    return total // 2, total - total // 2


def _conv(in_channels: int, out_channels: int, kernel: int, precision, rngs: nnx.Rngs, dims: int = 2) -> nnx.Conv:
    bound = 1.0 / math.sqrt(in_channels * kernel**dims)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    pad = _same_pad(kernel)
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel,) * dims,
        padding=(pad,) * dims,
        kernel_init=TORCH_KERNEL_INIT,
        bias_init=bias_init,
        precision=precision,
        rngs=rngs,
    )


def blur_downsample(x: jax.Array, taps: tuple[int, ...] = BLUR_KERNELS[4]) -> jax.Array:
    """``x`` ``(b, h, w, c)`` blurred by the normalised outer product of ``taps`` and
    subsampled by 2, each channel alone, padded as a size-4 stride-2 "same" window."""
    kernel = np.outer(taps, taps).astype(np.float32)
    kernel /= kernel.sum()
    channels = x.shape[-1]

    def pad(size: int) -> tuple[int, int]:
        total = max((math.ceil(size / 2) - 1) * 2 + 4 - size, 0)
        return total // 2, total - total // 2

    weight = jnp.broadcast_to(jnp.asarray(kernel, x.dtype)[:, :, None, None], (*kernel.shape, 1, channels))
    return jax.lax.conv_general_dilated(
        x,
        weight,
        window_strides=(2, 2),
        padding=(pad(x.shape[1]), pad(x.shape[2])),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST,
    )


def blur_downsample_3d(x: jax.Array, taps: tuple[int, ...] = BLUR_KERNELS[4], temporal: bool = False) -> jax.Array:
    """``x`` ``(b, t, h, w, c)`` blurred over (h, w) by the normalised outer product of
    ``taps`` and subsampled by 2 there (padded as a size-``len(taps)`` stride-2 "same"
    window), each channel alone; ``temporal``: also every other frame (0, 2, ...)."""
    kernel = np.outer(taps, taps).astype(np.float32)
    kernel /= kernel.sum()
    channels, k = x.shape[-1], len(taps)

    def pad(size: int) -> tuple[int, int]:
        total = max((math.ceil(size / 2) - 1) * 2 + k - size, 0)
        return total // 2, total - total // 2

    weight = jnp.broadcast_to(jnp.asarray(kernel, x.dtype)[None, :, :, None, None], (1, k, k, 1, channels))
    return jax.lax.conv_general_dilated(
        x,
        weight,
        window_strides=(2 if temporal else 1, 2, 2),
        padding=((0, 0), pad(x.shape[2]), pad(x.shape[3])),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST,
    )


def _adaptive_max_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    """Max over torch's adaptive windows ``[floor(i n / m), ceil((i + 1) n / m))`` of one axis."""
    n = x.shape[axis]
    starts = [(i * n) // out_size for i in range(out_size)]
    ends = [-((-(i + 1) * n) // out_size) for i in range(out_size)]
    width = max(e - s for s, e in zip(starts, ends))
    # windows shorter than the widest repeat their last index (max is idempotent)
    index = np.array([[min(s + k, e - 1) for k in range(width)] for s, e in zip(starts, ends)])
    gathered = jnp.take(x, jnp.asarray(index.reshape(-1)), axis=axis)
    shape = x.shape[:axis] + (out_size, width) + x.shape[axis + 1 :]
    return gathered.reshape(shape).max(axis=axis + 1)


def adaptive_max_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``torch.nn.AdaptiveMaxPool2d(size)`` of ``x`` ``(b, h, w, c)`` (windows are
    rectangles, so the max is taken one axis at a time); a smaller input repeats pixels."""
    return _adaptive_max_axis(_adaptive_max_axis(x, 1, size[0]), 2, size[1])


def _check_settings(num_stages: int, blur_kernel_size: int, hidden_channels: int) -> None:
    """The settings both discriminators share, each bad one named."""
    if num_stages < 1:
        raise ValueError(f"the discriminator needs at least one stage, got num_stages={num_stages}")
    if blur_kernel_size not in BLUR_KERNELS:
        raise ValueError(f"blur_kernel_size must be one of {sorted(BLUR_KERNELS)}, got {blur_kernel_size}")
    if hidden_channels % _GROUPS:
        raise ValueError(f"hidden_channels must be a multiple of {_GROUPS} (GroupNorm), got {hidden_channels}")


class PatchDiscriminator(nnx.Module):
    """The reference's ``NLayerDiscriminator(with_condition=False)``: images ``(b, c, h, w)``
    (or videos ``(b, t, c, h, w)``, frames scored alone) to logits ``(b, 1, 16, 16)``
    (``(b * t, 1, 16, 16)``). ``hidden_channels`` must be a multiple of 32 (GroupNorm).
    ``precision``: the convolutions' (None: the platform's default, bfloat16 passes on TPU;
    ``jax.lax.Precision.HIGHEST``: float32, as the reference computes its losses)."""

    def __init__(
        self,
        num_channels: int = 3,
        hidden_channels: int = 128,
        num_stages: int = 3,
        blur_kernel_size: int = 4,
        *,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        _check_settings(num_stages, blur_kernel_size, hidden_channels)
        self.num_channels = num_channels
        self.blur_taps = BLUR_KERNELS[blur_kernel_size]
        widths = [hidden_channels] + [hidden_channels * 2**i for i in range(num_stages)]
        self.block_in = _conv(num_channels, hidden_channels, 5, precision, rngs)
        self.stage_convs = nnx.List([_conv(widths[i], widths[i + 1], 3, precision, rngs) for i in range(num_stages)])
        self.stage_norms = nnx.List(
            [nnx.GroupNorm(w, num_groups=_GROUPS, epsilon=1e-5, use_fast_variance=False, rngs=rngs) for w in widths[1:]]
        )
        self.logits_hidden = _conv(widths[-1], widths[-1], 1, precision, rngs)
        self.logits_out = _conv(widths[-1], 1, 5, precision, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim == 5:
            images = images.reshape((-1, *images.shape[2:]))
        if images.ndim != 4 or images.shape[1] != self.num_channels:
            raise ValueError(
                f"images must be (b, {self.num_channels}, h, w) or (b, t, {self.num_channels}, h, w), "
                f"got shape {tuple(images.shape)}"
            )
        h = jax.nn.leaky_relu(self.block_in(jnp.transpose(images, (0, 2, 3, 1))), LEAKY_SLOPE)
        for conv, norm in zip(self.stage_convs, self.stage_norms):
            h = blur_downsample(conv(h), self.blur_taps)
            h = jax.nn.leaky_relu(norm(h), LEAKY_SLOPE)
        h = adaptive_max_pool(h, LOGITS_SIZE)
        h = self.logits_out(jax.nn.leaky_relu(self.logits_hidden(h), LEAKY_SLOPE))
        return jnp.transpose(h, (0, 3, 1, 2))


CLIP_LOGITS_SIZE = (2, 16, 16)


class ClipDiscriminator(nnx.Module):
    """The reference's ``NLayer3DDiscriminator(with_condition=False)``: clips ``(b, t, c, h, w)``
    scored whole, logits ``(b, 1, 2, 16, 16)`` (torch's ``(b, c, t, h, w)``). Arguments as
    ``PatchDiscriminator``'s."""

    scores_clips = True  # the losses give it clips, not frames

    def __init__(
        self,
        num_channels: int = 3,
        hidden_channels: int = 128,
        num_stages: int = 3,
        blur_kernel_size: int = 4,
        *,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        _check_settings(num_stages, blur_kernel_size, hidden_channels)
        self.num_channels = num_channels
        self.blur_taps = BLUR_KERNELS[blur_kernel_size]
        keep = num_stages // 3  # the reference's int(num_stages * 1/3) stages keep every frame
        self.temporal = tuple([False] * keep + [True] * (num_stages - keep))
        widths = [hidden_channels] + [hidden_channels * 2**i for i in range(num_stages)]
        self.block_in = _conv(num_channels, hidden_channels, 5, precision, rngs, 3)
        self.stage_convs = nnx.List([_conv(widths[i], widths[i + 1], 3, precision, rngs, 3) for i in range(num_stages)])
        self.stage_norms = nnx.List(
            [nnx.GroupNorm(w, num_groups=_GROUPS, epsilon=1e-5, use_fast_variance=False, rngs=rngs) for w in widths[1:]]
        )
        self.logits_hidden = _conv(widths[-1], widths[-1], 1, precision, rngs, 3)
        self.logits_out = _conv(widths[-1], 1, 5, precision, rngs, 3)

    def __call__(self, clips: jax.Array) -> jax.Array:
        if clips.ndim != 5 or clips.shape[2] != self.num_channels:
            raise ValueError(
                f"clips must be (b, t, {self.num_channels}, h, w) (the 3D discriminator scores whole clips), "
                f"got shape {tuple(clips.shape)}"
            )
        h = jax.nn.leaky_relu(self.block_in(jnp.transpose(clips, (0, 1, 3, 4, 2))), LEAKY_SLOPE)
        for conv, norm, temporal in zip(self.stage_convs, self.stage_norms, self.temporal):
            h = blur_downsample_3d(conv(h), self.blur_taps, temporal)
            h = jax.nn.leaky_relu(norm(h), LEAKY_SLOPE)
        for axis, size in enumerate(CLIP_LOGITS_SIZE, start=1):
            h = _adaptive_max_axis(h, axis, size)
        h = self.logits_out(jax.nn.leaky_relu(self.logits_hidden(h), LEAKY_SLOPE))
        return jnp.transpose(h, (0, 4, 1, 2, 3))


def torch_name(path: tuple[str, ...]) -> tuple[str, object]:
    """The reference module's state-dict name of one of our parameters, and its layout."""
    *module, leaf = path
    if module[0] == "stage_norms":  # blocks.(2i+1) = (blur, GroupNorm, LeakyReLU)
        return f"blocks.{2 * int(module[1]) + 1}.1.{'weight' if leaf == 'scale' else 'bias'}", SAME
    prefix = {
        "block_in": "block_in.0",
        "logits_hidden": "to_logits.0",
        "logits_out": "to_logits.2",
    }.get(module[0])
    if prefix is None:  # stage_convs.i -> blocks.(2i)
        prefix = f"blocks.{2 * int(module[1])}"
    return f"{prefix}.{'weight' if leaf == 'kernel' else 'bias'}", CONV if leaf == "kernel" else SAME


def _torch_name_3d(path: tuple[str, ...]) -> tuple[str, object]:
    name, layout = torch_name(path)
    return name, (2, 3, 4, 1, 0) if layout == CONV else layout  # OIDHW -> DHWIO


def load_discriminator(path_or_state_dict, **architecture) -> PatchDiscriminator:
    """A ``PatchDiscriminator`` (``architecture``: its constructor's keywords) holding the
    weights of a state dict of the reference's ``NLayerDiscriminator``: a ``.pth`` file or
    a mapping. Its fixed blur kernels (``blocks.<odd>.0.kernel`` buffers) are checked
    against ours; a missing, unexpected or mis-shaped tensor is one ``StateDictMismatch``."""
    return _load(PatchDiscriminator, torch_name, "NLayerDiscriminator", path_or_state_dict, architecture)


def load_clip_discriminator(path_or_state_dict, **architecture) -> ClipDiscriminator:
    """``load_discriminator`` for the reference's ``NLayer3DDiscriminator``: a ``ClipDiscriminator``."""
    return _load(ClipDiscriminator, _torch_name_3d, "NLayer3DDiscriminator", path_or_state_dict, architecture)


def _load(cls, names, what: str, path_or_state_dict, architecture):
    state_dict = read_state_dict(path_or_state_dict, f"discriminator weights (the reference's {what})")
    make = lambda: cls(**architecture, rngs=nnx.Rngs(0))  # noqa: E731
    taps = BLUR_KERNELS[architecture.get("blur_kernel_size", 4)]
    blur = np.outer(taps, taps).astype(np.float32)
    blur /= blur.sum()
    blur_name = f"{list(taps)} x {list(taps)} / {int(np.sum(taps)) ** 2}"
    weights = {}
    for name, value in state_dict.items():
        if not (name.startswith("blocks.") and name.endswith(".0.kernel")):
            weights[name] = value
            continue
        value = np.asarray(value, np.float32)
        if value.size != blur.size:
            raise StateDictMismatch(mismatched=[(name, tuple(value.shape), (1, 1, *blur.shape))])
        if not np.allclose(value.reshape(blur.shape), blur):
            raise ValueError(f"{name} is not the {blur_name} blur kernel this discriminator uses: {value.reshape(-1)}")
    return module_from_state_dict(make, weights, names)
