"""Analytic FLOP counts of the model: the matmuls of every Transformer layer, the input,
text and output projections, and attention (``QK^T`` and ``PV``), 2 FLOPs per
multiply-add. Causal attention is counted at half its square, as MaxText counts it
(``causal_half=False`` counts the whole square, as the compiled program computes it).
A training step is 3x the forward pass (the backward pass is twice the forward)."""

from __future__ import annotations

from starflow_jax.config.model_config import ModelConfig


def layer_flops(
    length: int,
    channels: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    hidden: int,
    swiglu: bool,
    attended_pairs: float,
) -> float:
    """One Transformer layer over ``length`` slots, attention over ``attended_pairs``
    (query, key) pairs."""
    qkv = 2 * length * channels * (heads + 2 * kv_heads) * head_dim
    out = 2 * length * heads * head_dim * channels
    mlp = 2 * length * channels * hidden * (3 if swiglu else 2)
    attn = 2 * 2 * attended_pairs * heads * head_dim
    return qkv + out + mlp + attn


def _pairs(length: int, causal: bool, causal_half: bool) -> float:
    if causal and causal_half:
        return length * length / 2
    return float(length * length)


def block_layouts(cfg: ModelConfig, x_shape: tuple[int, ...]) -> list[dict]:
    """Per flow block with layers, on an input ``(b, c, H, W)`` or ``(b, t, c, H, W)``:
    ``block`` (index), ``layers``, ``channels``, ``heads``, ``kv_heads``, ``seqs``
    (sequences per sample: the frames of a frame-local block, else 1), ``tokens`` (per
    sequence) and ``txt`` (text slots per sequence)."""
    frames = x_shape[1] if len(x_shape) == 5 else 1
    frame_tokens = (x_shape[-2] // cfg.patch_size) * (x_shape[-1] // cfg.patch_size)
    base_heads = cfg.num_heads or cfg.channels // cfg.head_dim
    out = []
    for i, n_layers in enumerate(cfg.layers_per_block):
        if n_layers == 0:
            continue
        top = i == cfg.num_blocks - 1
        heads = (cfg.top_num_heads or cfg.top_channels // cfg.head_dim) if top else base_heads
        conditioned = cfg.txt_dim > 0 and (top or not cfg.cond_top_only)
        local = cfg.shallow_block_local and frames > 1 and not top
        seqs, n = (frames, frame_tokens) if local else (1, frames * frame_tokens)
        out.append(
            dict(
                block=i,
                layers=n_layers,
                channels=cfg.top_channels if top else cfg.channels,
                heads=heads,
                kv_heads=cfg.num_kv_heads or heads,
                seqs=seqs,
                tokens=n,
                txt=cfg.txt_size if conditioned else 0,
            )
        )
    return out


def forward_flops(
    cfg: ModelConfig, x_shape: tuple[int, ...], causal_half: bool = True, include_denoiser: bool = False
) -> float:
    """FLOPs of the flow's forward pass (and the learnable denoiser's) on an input of
    shape ``(b, c, H, W)`` or ``(b, t, c, H, W)``."""
    b = x_shape[0]
    frames = x_shape[1] if len(x_shape) == 5 else 1
    h, w = x_shape[-2] // cfg.patch_size, x_shape[-1] // cfg.patch_size
    frame_tokens = h * w
    pd = cfg.patch_dim
    total = 0.0
    base_heads = cfg.num_heads or cfg.channels // cfg.head_dim
    for lay in block_layouts(cfg, x_shape):
        c, n, t = lay["channels"], lay["tokens"], lay["txt"]
        length = t + n
        per_seq = 2 * n * pd * c + 2 * n * c * 2 * pd + 2 * t * cfg.txt_dim * c
        per_seq += lay["layers"] * layer_flops(
            length,
            c,
            lay["heads"],
            lay["kv_heads"],
            cfg.head_dim,
            int(c * cfg.expansion),
            cfg.use_swiglu,
            _pairs(length, True, causal_half),
        )
        total += lay["seqs"] * per_seq
    if include_denoiser and cfg.learnable_self_denoiser:
        c, heads = cfg.channels, base_heads
        t = cfg.txt_size if (cfg.conditional_denoiser and cfg.txt_dim > 0) else 0
        n = frames * frame_tokens
        length = t + n
        total += 2 * n * pd * c * 2 + 2 * t * cfg.txt_dim * c
        total += cfg.denoiser_layers * layer_flops(
            length,
            c,
            heads,
            cfg.num_kv_heads or heads,
            cfg.head_dim,
            int(c * cfg.expansion),
            cfg.use_swiglu,
            float(length * length),
        )
    return b * total


def train_step_flops(cfg: ModelConfig, x_shape: tuple[int, ...]) -> float:
    """Model FLOPs of one training step (forward + backward, denoiser included)."""
    return 3 * forward_flops(cfg, x_shape, causal_half=True, include_denoiser=True)
