"""The model's configuration: one frozen dataclass, validated when built.

Field names follow the keyword arguments of the PyTorch reference's
``transformer_flow.Model`` so that a configuration moves between the two
implementations without renaming (see ``starflow_jax.config.reference_args``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

NORM_TYPES = ("layer_norm", "rms_norm", "none")
SEQ_ORDERS = ("R2L", "L2R")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration that names unknown keys or holds inconsistent values."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a STARFlow / STARFlow-V model.

    ``img_size`` is the side of the (latent) image the flow models, before
    patchifying; ``layers_per_block`` holds one value per flow block (a single
    value is repeated ``num_blocks`` times, as in the reference); a block with
    0 layers is the identity. The last block is the deep ("top") block next to
    the prior; the others are the shallow blocks next to the data.
    """

    in_channels: int
    img_size: int
    patch_size: int
    channels: int
    num_blocks: int
    layers_per_block: tuple[int, ...]
    head_dim: int = 64
    num_heads: int | None = None
    num_kv_heads: int | None = None
    rope: bool = False
    pt_seq_len: int | None = None
    # Spatial RoPE on a torus (ours, not the reference's): token positions in grid units and
    # spatial frequencies 2 pi k / grid side, so that a shift with wrap-around (moving digits)
    # is one relative offset for every token. Only for data that wrap around.
    rope_wrap: bool = False
    # Keys rotated by the position of the token their slot holds (slot i holds token i - 1
    # after the start token) and queries by the token they predict (ours; the reference
    # rotates both by the slot's position): a copy from another token is one offset.
    rope_content_keys: bool = False
    sos: bool = False
    txt_size: int = 0
    txt_dim: int = 0
    cond_top_only: bool = False
    use_softplus: bool = False
    use_swiglu: bool = False
    use_bias: bool = True
    use_qk_norm: bool = False
    use_post_norm: bool = False
    use_final_norm: bool = False
    hf_style_rope: bool = False
    norm_type: str = "layer_norm"
    soft_clip: float = 0.0
    seq_order: str = "R2L"
    learnable_self_denoiser: bool = False
    conditional_denoiser: bool = False
    temporal_causal: int = 0
    top_block_channels: int | None = None
    shallow_block_local: bool = False
    denoiser_window: int | None = None
    local_attn_window: int | None = None
    denoiser_layers: int = 8
    expansion: float = 4.0
    # Numerics: parameters are always stored in ``param_dtype``; matmuls run in
    # ``dtype``. The affine step and log-determinant are always float32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Training-time attention (sampling uses its KV cache): "xla" materialises the scores,
    # "per_head" too, head by head (the fastest on the CPU), "blocked" runs over key blocks
    # of ``attention_block`` with an online softmax (memory linear in the sequence: long
    # video sequences), "splash" the Pallas TPU kernel, "auto" splash on TPU, per_head on
    # the CPU, xla on GPU (layers.attention.resolve_attention).
    attention_impl: str = "auto"
    attention_block: int = 512

    def __post_init__(self):
        lpb = self.layers_per_block
        if isinstance(lpb, int):
            lpb = (lpb,)
        lpb = tuple(int(v) for v in lpb)
        if len(lpb) == 1:
            lpb = lpb * int(self.num_blocks)
        object.__setattr__(self, "layers_per_block", lpb)
        for name in (
            "rope",
            "sos",
            "cond_top_only",
            "use_softplus",
            "use_swiglu",
            "use_bias",
            "use_qk_norm",
            "use_post_norm",
            "use_final_norm",
            "hf_style_rope",
            "rope_wrap",
            "rope_content_keys",
            "learnable_self_denoiser",
            "conditional_denoiser",
            "shallow_block_local",
        ):
            object.__setattr__(self, name, bool(getattr(self, name)))
        object.__setattr__(self, "soft_clip", float(self.soft_clip or 0.0))
        object.__setattr__(self, "temporal_causal", int(self.temporal_causal or 0))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        for name in ("in_channels", "img_size", "patch_size", "channels", "num_blocks", "head_dim"):
            need(int(getattr(self, name)) > 0, f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(
            len(self.layers_per_block) == self.num_blocks,
            f"layers_per_block has {len(self.layers_per_block)} entries but num_blocks={self.num_blocks} "
            "(give one value, or one per block)",
        )
        need(all(v >= 0 for v in self.layers_per_block), f"layers_per_block must be >= 0, got {self.layers_per_block}")
        need(self.layers_per_block[-1] > 0, "the top (last) block must have at least one layer")
        need(
            self.img_size % self.patch_size == 0,
            f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}",
        )
        need(self.norm_type in NORM_TYPES, f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        need(self.seq_order in SEQ_ORDERS, f"seq_order must be one of {SEQ_ORDERS}, got {self.seq_order!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.param_dtype in DTYPES, f"param_dtype must be one of {DTYPES}, got {self.param_dtype!r}")
        need(
            self.attention_impl in ("auto", "xla", "per_head", "blocked", "splash"),
            f"attention_impl must be 'auto', 'xla', 'per_head', 'blocked' or 'splash', got {self.attention_impl!r}",
        )
        need(int(self.attention_block) > 0, f"attention_block must be positive, got {self.attention_block}")
        need(self.txt_size >= 0 and self.txt_dim >= 0, "txt_size and txt_dim must be >= 0")
        need(
            self.txt_dim == 0 or self.txt_size > 0,
            f"txt_dim={self.txt_dim} needs txt_size > 0 (the length of the conditioning sequence)",
        )
        need(not self.local_attn_window or self.shallow_block_local, "local_attn_window requires shallow_block_local")
        need(not self.shallow_block_local or self.cond_top_only, "shallow_block_local requires cond_top_only")
        need(not self.cond_top_only or self.txt_size > 0, "cond_top_only requires txt_size > 0")
        need(self.seq_order == "L2R" or self.temporal_causal == 0, "seq_order must be L2R when temporal_causal is set")
        for channels, heads, where in (
            (self.channels, self.num_heads, "channels"),
            (self.top_channels, self.top_num_heads, "top_block_channels"),
        ):
            nh = heads if heads is not None else channels // self.head_dim
            need(nh > 0, f"{where}={channels} gives no attention heads with head_dim={self.head_dim}")
            nkv = self.num_kv_heads if self.num_kv_heads is not None else nh
            need(nh % nkv == 0, f"num_heads={nh} is not a multiple of num_kv_heads={nkv} ({where})")
        need(not self.rope_wrap or self.rope, "rope_wrap needs rope=True")
        need(not self.rope_content_keys or self.rope, "rope_content_keys needs rope=True")
        need(
            not self.rope_content_keys or self.sos,
            "rope_content_keys needs sos=True (the start token that puts token i - 1 in slot i)",
        )
        need(
            not (self.rope_wrap and self.pt_seq_len),
            f"rope_wrap places tokens in grid units; pt_seq_len={self.pt_seq_len} has no meaning with it (unset one)",
        )
        if self.rope:
            need(self.head_dim % 4 == 0, f"rope needs head_dim divisible by 4, got {self.head_dim}")
            if self.txt_size > 0:
                need(self.head_dim // 2 > 8, "rope with text positions needs head_dim > 16 (8 latent frequencies)")

    # ------------------------------------------------------------ derived
    @property
    def seq_side(self) -> int:
        """Side of the patch grid."""
        return self.img_size // self.patch_size

    @property
    def rope_seq_len(self) -> int:
        """The reference's ``pt_seq_len``: the grid side RoPE positions are normalised to."""
        return self.pt_seq_len or self.seq_side

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def top_channels(self) -> int:
        return self.top_block_channels or self.channels

    @property
    def top_num_heads(self) -> int | None:
        if self.top_channels != self.channels and self.num_heads is None:
            return self.top_channels // self.head_dim
        return self.num_heads

    @property
    def is_video(self) -> bool:
        return self.temporal_causal > 0

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers_per_block"] = list(self.layers_per_block)
        return d

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping; unknown keys are an error that lists them."""
        values = dict(values)
        known = set(cls.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}; known keys: {sorted(known)}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in values]
        if missing:
            raise ConfigError(f"model config is missing required keys: {missing}")
        lpb = values.get("layers_per_block")
        if isinstance(lpb, (list, tuple)):
            values["layers_per_block"] = tuple(lpb)
        elif isinstance(lpb, str):
            values["layers_per_block"] = tuple(int(v) for v in lpb.replace(",", " ").split())
        return cls(**values)
