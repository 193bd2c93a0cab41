"""Configuration of the KL autoencoder (the SD-VAE): the fields of diffusers'
``AutoencoderKL`` config that shape the network or the latent scaling.

Field names follow diffusers' ``config.json`` so that a checkpoint's config moves
over without renaming (``VAEConfig.from_diffusers_config``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
ACT_FNS = ("silu", "swish")
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"

# diffusers config keys that carry no architecture: bookkeeping and precision hints.
_IGNORED_KEYS = ("force_upcast",)


class VAEConfigError(ValueError):
    """A VAE configuration with unsupported options or inconsistent values."""


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture and latent scaling of a KL autoencoder.

    ``block_out_channels`` has one entry per resolution (the encoder halves the
    side between consecutive entries); the encoder has ``layers_per_block`` resnets
    per resolution, the decoder one more. Latents are scaled for the generator as
    ``(z - shift_factor) * scaling_factor`` (``shift_factor`` None means 0).
    ``dtype`` is the compute dtype; parameters are stored in ``param_dtype``.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if isinstance(self.block_out_channels, int):
            set_("block_out_channels", (self.block_out_channels,))
        set_("block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if isinstance(self.sample_size, (list, tuple)):
            set_("sample_size", tuple(int(s) for s in self.sample_size))
        set_("scaling_factor", float(self.scaling_factor))
        if self.shift_factor is not None:
            set_("shift_factor", float(self.shift_factor))
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            set_(name, bool(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise VAEConfigError(msg)

        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(
            len(self.block_out_channels) > 0 and all(c > 0 for c in self.block_out_channels),
            f"block_out_channels must be non-empty positive integers, got {self.block_out_channels}",
        )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        need(not bad, f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        need(self.act_fn in ACT_FNS, f"act_fn must be one of {ACT_FNS} (SiLU), got {self.act_fn!r}")
        need(self.scaling_factor > 0, f"scaling_factor must be positive, got {self.scaling_factor}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.param_dtype in DTYPES, f"param_dtype must be one of {DTYPES}, got {self.param_dtype!r}")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> VAEConfig:
        """A diffusers ``AutoencoderKL`` config (the dict of its ``config.json``) to a
        ``VAEConfig``; ``overrides`` set our own fields (e.g. ``dtype="bfloat16"``).

        Keys starting with ``_`` and precision hints (``force_upcast``) are ignored;
        block types other than ``DownEncoderBlock2D``/``UpDecoderBlock2D``, per-channel
        ``latents_mean``/``latents_std`` and unknown keys raise ``VAEConfigError``."""
        cfg = {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in _IGNORED_KEYS}
        problems = []
        n = len(cfg.get("block_out_channels", cls.block_out_channels) or ())
        down = tuple(cfg.pop("down_block_types", (DOWN_BLOCK,) * n))
        up = tuple(cfg.pop("up_block_types", (UP_BLOCK,) * n))
        if any(t != DOWN_BLOCK for t in down):
            problems.append(f"down_block_types must all be {DOWN_BLOCK!r}, got {list(down)}")
        if any(t != UP_BLOCK for t in up):
            problems.append(f"up_block_types must all be {UP_BLOCK!r}, got {list(up)}")
        if len(down) != n or len(up) != n:
            problems.append(
                f"down_block_types ({len(down)}) and up_block_types ({len(up)}) must have one "
                f"entry per block_out_channels ({n})"
            )
        for key in ("latents_mean", "latents_std"):
            if cfg.pop(key, None) is not None:
                problems.append(
                    f"{key} (per-channel latent normalisation) is not supported; "
                    "only scaling_factor and shift_factor are"
                )
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            problems.append(f"unknown or unsupported config keys: {unknown}")
        if problems:
            raise VAEConfigError("unsupported AutoencoderKL config:\n  " + "\n  ".join(problems))
        return cls(**{**cfg, **overrides})

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers ``AutoencoderKL`` keyword arguments of this configuration."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.pop("dtype"), out.pop("param_dtype")
        n = len(self.block_out_channels)
        out["block_out_channels"] = list(self.block_out_channels)
        out["down_block_types"] = [DOWN_BLOCK] * n
        out["up_block_types"] = [UP_BLOCK] * n
        return out
