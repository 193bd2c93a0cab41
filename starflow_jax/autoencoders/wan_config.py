"""Configuration of the Wan video autoencoder: the fields of diffusers' ``AutoencoderKLWan``
config, for both forms of the network.

- Wan2.1 (``Wan-AI/Wan2.1-*-Diffusers``): plain residual stacks, ``z_dim=16``, no patchify.
- Wan2.2 (``Wan-AI/Wan2.2-TI2V-5B-Diffusers``): ``is_residual=True`` (blocks with
  average-down / duplicate-up shortcuts), ``patch_size=2`` (the video is folded 2x2 into
  channels first: ``in_channels=12`` for RGB), ``z_dim=48`` and a wider decoder
  (``decoder_base_dim``).

Field names follow diffusers' ``config.json`` (including its spelling ``temperal_*``), so
that a checkpoint's config moves over without renaming (``WanVAEConfig.from_diffusers_config``).
``temporal_latent_scale`` is ours: the STARFlow-V reference names its VAE
``Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6`` and multiplies the normalised latents of every frame
after the first by that number (see ``split_vae_name`` and ``wan_vae.encode_video``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
# Frames the encoder takes per call after the first frame (diffusers encodes frame 0 alone,
# then chunks of 4 frames, carrying the causal convolutions' past between calls).
ENCODE_CHUNK = 4

# diffusers' defaults: the Wan2.1 latent statistics.
WAN21_LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)

# Config keys that carry no architecture. ``clip_output`` appears in the Wan2.2 checkpoint's
# config; diffusers (0.42) ignores it and always clamps the decoded video to [-1, 1], as we do.
_IGNORED_KEYS = ("clip_output",)


class WanVAEConfigError(ValueError):
    """A Wan VAE configuration with unsupported options or inconsistent values."""


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """Architecture and latent normalisation of a Wan video autoencoder.

    The encoder has ``len(dim_mult)`` levels of ``base_dim * dim_mult[i]`` channels, halving
    the side between levels, and halving time where ``temperal_downsample[i]``; the decoder
    mirrors it with ``decoder_base_dim`` (None: ``base_dim``). Latents are normalised for the
    generator as ``(z - latents_mean) / latents_std`` per channel. ``dtype`` is the compute
    dtype; parameters are stored in ``param_dtype``. ``dropout`` is accepted and unused
    (inference only).
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8
    temporal_latent_scale: float = 1.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name, kind in (
            ("dim_mult", int),
            ("attn_scales", float),
            ("temperal_downsample", bool),
            ("latents_mean", float),
            ("latents_std", float),
        ):
            value = getattr(self, name)
            if value is None or isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise WanVAEConfigError(f"{name} must be a list, got {value!r}")
            set_(name, tuple(kind(v) for v in value))
        set_("is_residual", bool(self.is_residual))
        set_("temporal_latent_scale", float(self.temporal_latent_scale))
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def patch(self) -> int:
        return self.patch_size or 1

    @property
    def pixel_channels(self) -> int:
        """Channels of the video the encoder takes (``in_channels`` before patchifying)."""
        return self.in_channels // self.patch**2

    @property
    def pixel_out_channels(self) -> int:
        return self.out_channels // self.patch**2

    @property
    def spatial_compression(self) -> int:
        """Video side / latent side (patchify included)."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch

    @property
    def temporal_compression(self) -> int:
        """Latent frames after the first per video frames after the first."""
        return 2 ** sum(self.temperal_downsample)

    def encoder_dims(self) -> list[int]:
        return [self.base_dim * m for m in (1, *self.dim_mult)]

    def decoder_dims(self) -> list[int]:
        return [self.decoder_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal_compression

    def video_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal_compression

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise WanVAEConfigError(msg)

        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            v = getattr(self, name)
            need(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                f"{name} must be a positive integer, got {v!r}",
            )
        need(
            self.decoder_base_dim is None or (isinstance(self.decoder_base_dim, int) and self.decoder_base_dim > 0),
            f"decoder_base_dim must be None or a positive integer, got {self.decoder_base_dim!r}",
        )
        need(
            len(self.dim_mult) > 0 and all(m > 0 for m in self.dim_mult),
            f"dim_mult must be non-empty positive integers, got {self.dim_mult}",
        )
        levels = len(self.dim_mult) - 1
        need(
            len(self.temperal_downsample) == levels,
            f"temperal_downsample needs one entry per downsampling level ({levels} for dim_mult "
            f"{list(self.dim_mult)}), got {list(self.temperal_downsample)}",
        )
        need(
            self.temporal_compression <= ENCODE_CHUNK,
            f"at most 2 temporal downsamplings are supported (the encoder reads {ENCODE_CHUNK} frames "
            f"per chunk), got temperal_downsample {list(self.temperal_downsample)}",
        )
        need(
            not self.attn_scales,
            f"attn_scales must be empty (diffusers' AutoencoderKLWan cannot run "
            f"attention in its down blocks), got {list(self.attn_scales)}",
        )
        need(self.dropout >= 0, f"dropout must be >= 0, got {self.dropout}")
        need(
            self.patch_size is None or (isinstance(self.patch_size, int) and self.patch_size > 0),
            f"patch_size must be None or a positive integer, got {self.patch_size!r}",
        )
        for name in ("in_channels", "out_channels"):
            need(
                getattr(self, name) % self.patch**2 == 0,
                f"{name}={getattr(self, name)} is not divisible by patch_size**2={self.patch**2}",
            )
        need(
            len(self.latents_mean) == self.z_dim and len(self.latents_std) == self.z_dim,
            f"latents_mean and latents_std need z_dim={self.z_dim} entries, got "
            f"{len(self.latents_mean)} and {len(self.latents_std)}",
        )
        need(all(s > 0 for s in self.latents_std), "latents_std must be positive")
        need(
            self.temporal_latent_scale > 0, f"temporal_latent_scale must be positive, got {self.temporal_latent_scale}"
        )
        if self.scale_factor_spatial is not None:
            need(
                self.scale_factor_spatial == self.spatial_compression,
                f"scale_factor_spatial={self.scale_factor_spatial} does not match the architecture "
                f"(2**(len(dim_mult)-1) * patch_size = {self.spatial_compression})",
            )
        if self.scale_factor_temporal is not None:
            need(
                self.scale_factor_temporal == self.temporal_compression,
                f"scale_factor_temporal={self.scale_factor_temporal} does not match temperal_downsample "
                f"(2**{sum(self.temperal_downsample)} = {self.temporal_compression})",
            )
        if self.is_residual:
            self._validate_shortcuts(need)
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.param_dtype in DTYPES, f"param_dtype must be one of {DTYPES}, got {self.param_dtype!r}")

    def _validate_shortcuts(self, need) -> None:
        """The Wan2.2 shortcuts fold/unfold channels: their channel counts must divide."""
        last = len(self.dim_mult) - 1
        enc = self.encoder_dims()
        for i, (cin, cout) in enumerate(zip(enc[:-1], enc[1:])):
            down = i != last
            factor = (2 if down and self.temperal_downsample[i] else 1) * (4 if down else 1)
            need(
                cin * factor % cout == 0,
                f"encoder block {i}: {cin} channels x {factor} (the shortcut's downsampling) are not "
                f"divisible by {cout} output channels",
            )
        dec = self.decoder_dims()
        ups = tuple(reversed(self.temperal_downsample))
        for i, (cin, cout) in enumerate(zip(dec[:-1], dec[1:])):
            if i != last:
                factor = (2 if ups[i] else 1) * 4
                need(
                    cout * factor % cin == 0,
                    f"decoder block {i}: {cout} channels x {factor} (the shortcut's upsampling) are not "
                    f"divisible by {cin} input channels",
                )

    # ------------------------------------------------------------------ diffusers configs
    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> WanVAEConfig:
        """A diffusers ``AutoencoderKLWan`` config (the dict of its ``config.json`` or
        ``model.config``) to a ``WanVAEConfig``; ``overrides`` set our own fields (``dtype``,
        ``temporal_latent_scale``). Keys starting with ``_`` and ``clip_output`` are ignored;
        unknown keys raise ``WanVAEConfigError``."""
        cfg = {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in _IGNORED_KEYS}
        ours = {"dtype", "param_dtype", "temporal_latent_scale"}
        fields = {f.name for f in dataclasses.fields(cls)} - ours
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise WanVAEConfigError(f"unsupported AutoencoderKLWan config: unknown keys {unknown}")
        bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if bad:
            raise WanVAEConfigError(f"unknown WanVAEConfig fields {bad}")
        return cls(**{**cfg, **overrides})

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers ``AutoencoderKLWan`` keyword arguments of this configuration."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("dtype", "param_dtype", "temporal_latent_scale"):
            out.pop(name)
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            out[name] = list(out[name])
        return out


def split_vae_name(name: str) -> tuple[str, float | None]:
    """The reference's VAE name ``"Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6"`` to the model name and
    its temporal latent scale (None when the name has no ``:scale`` suffix)."""
    if ":" not in name:
        return name, None
    base, _, extra = name.rpartition(":")
    try:
        return base, float(extra)
    except ValueError as e:
        raise ValueError(
            f"VAE name {name!r}: the part after ':' must be the temporal latent scale (a number), got {extra!r}"
        ) from e
