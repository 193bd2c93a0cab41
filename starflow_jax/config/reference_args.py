"""Configurations from the PyTorch reference: its ``Model(**kwargs)`` keyword arguments
and its YAML files (``configs/*.yaml`` of apple/ml-starflow: an ``arguments:`` list of
one-key mappings holding ``train.py`` command-line arguments)."""

from __future__ import annotations

import difflib
import pathlib
from collections.abc import Mapping
from typing import Any

import yaml

from starflow_jax.config.model_config import ConfigError, ModelConfig

# Reference constructor arguments that only steer torch-side execution (activation
# checkpointing, compile-time options): accepted and dropped.
IGNORED_KWARGS = {"use_checkpoint", "use_checkpoint_mlp", "use_mm_attn", "noise_embed_denoiser"}

# ``Model`` keyword arguments that map one-to-one onto ModelConfig fields.
MODEL_KWARGS = {
    "in_channels",
    "img_size",
    "patch_size",
    "channels",
    "num_blocks",
    "layers_per_block",
    "head_dim",
    "num_heads",
    "num_kv_heads",
    "rope",
    "pt_seq_len",
    "sos",
    "txt_size",
    "txt_dim",
    "cond_top_only",
    "use_softplus",
    "use_swiglu",
    "use_bias",
    "use_qk_norm",
    "use_post_norm",
    "use_final_norm",
    "hf_style_rope",
    "norm_type",
    "soft_clip",
    "seq_order",
    "learnable_self_denoiser",
    "conditional_denoiser",
    "temporal_causal",
    "top_block_channels",
    "shallow_block_local",
    "denoiser_window",
    "local_attn_window",
}

# Hidden sizes of the text encoders the reference names (``--text``).
TEXT_ENCODER_DIMS = {
    "google/flan-t5-small": 512,
    "google/flan-t5-base": 768,
    "google/flan-t5-large": 1024,
    "google/flan-t5-xl": 2048,
    "google/flan-t5-xxl": 4096,
    "t5xl": 2048,
    "t5xxl": 4096,
    "google/t5-v1_1-xl": 2048,
    "google/t5-v1_1-xxl": 4096,
}

# ``train.py`` defaults of the arguments that shape the model.
TRAIN_DEFAULTS: dict[str, Any] = {
    "img_size": 32,
    "channel_size": 3,
    "txt_size": 0,
    "sos": 0,
    "seq_order": "R2L",
    "patch_size": 4,
    "channels": 512,
    "top_block_channels": None,
    "blocks": 4,
    "layers_per_block": [8],
    "rope": 0,
    "pt_seq_len": None,
    "use_softplus": 0,
    "cond_top_only": 0,
    "head_dim": 64,
    "num_heads": None,
    "num_kv_heads": None,
    "use_swiglu": 0,
    "use_qk_norm": 0,
    "use_post_norm": 0,
    "use_final_norm": 0,
    "use_bias": 1,
    "norm_type": "layer_norm",
    "use_pretrained_lm": None,
    "soft_clip": 0.0,
    "learnable_self_denoiser": 0,
    "conditional_denoiser": 0,
    "temporal_causal": 0,
    "shallow_block_local": 0,
    "denoiser_window": None,
    "local_attn_window": None,
    "vae": None,
    "text": None,
    "noise_std": 0.3,
    "noise_type": "gaussian",
    "cond_noise_level": 0,
    "batch_size": 128,
    "lr": 1e-4,
    "min_lr": 1e-6,
    "drop_label": 0.0,
    "drop_image": 0.0,
    "grad_clip": 0.0,
    "grad_skip": 0,
    "latent_norm_regularization": 0.0,
    "cfg": 0.0,
    "acc": 1,
    "epochs": 1000,
    "warmup_steps": None,
    "vid_size": None,
    "fps_cond": 0,
}

# The other ``train.py`` arguments (data, execution, logging, sampling during training; ``adaln``
# and ``nvp``, which its ``Model`` does not read): accepted in a YAML file and not used here.
OTHER_TRAIN_ARGUMENTS = frozenset(
    {
        "model_config_path",
        "train_seed",
        "data",
        "logdir",
        "dataset",
        "wds",
        "mix_aspect",
        "no_flip",
        "caption_column",
        "secondary_dataset",
        "secondary_img_size",
        "secondary_vid_size",
        "vae_decoder_factor",
        "finetuned_vae",
        "adaln",
        "nvp",
        "use_mm_attn",
        "noise_embed_denoiser",
        "secondary_batch_size",
        "secondary_ratio",
        "fp8",
        "use_8bit_adam",
        "epoch_length",
        "last_frame_cond",
        "video_to_video",
        "resume_path",
        "resume_epoch",
        "fsdp",
        "fsdp_text_encoder",
        "gradient_checkpoint",
        "gradient_checkpoint_mlp",
        "compile",
        "loss_scaling",
        "dry_run",
        "wandb_name",
        "save_every",
        "sample_freq",
        "num_samples",
        "sample_batch_size",
    }
)

# Every argument of the reference ``train.py``: the keys a reference YAML file may hold.
TRAIN_ARGUMENTS = frozenset(TRAIN_DEFAULTS) | OTHER_TRAIN_ARGUMENTS


def from_model_kwargs(kwargs: Mapping[str, Any], **overrides) -> ModelConfig:
    """A ModelConfig from the reference ``Model(...)`` keyword arguments (e.g. a case's
    ``meta.model_kwargs``). Unknown keys are an error that lists them."""
    kw = dict(kwargs)
    kw.update(overrides)
    if kw.get("use_pretrained_lm"):
        raise ConfigError(
            f"use_pretrained_lm={kw['use_pretrained_lm']!r} (a pretrained LLM top block) is not supported"
        )
    kw.pop("use_pretrained_lm", None)
    for k in IGNORED_KWARGS:
        kw.pop(k, None)
    unknown = sorted(set(kw) - MODEL_KWARGS - set(ModelConfig.field_names()))
    if unknown:
        raise ConfigError(f"unknown reference Model arguments: {unknown}")
    for k in ("num_heads", "num_kv_heads", "pt_seq_len", "top_block_channels", "denoiser_window", "local_attn_window"):
        if kw.get(k) == 0:  # the reference treats 0 like "not set" for these
            kw[k] = None
    return ModelConfig.from_dict(kw)


def vae_downsample_factor(vae: str | None) -> int:
    """Spatial downsampling of the autoencoder the reference names (``--vae``)."""
    if not vae or vae == "none":
        return 1
    name = vae.split(":")[0]
    if "Wan-AI/Wan2.2" in name:
        return 16
    if "Wan-AI/Wan2.1" in name:
        return 8
    return 8  # diffusers AutoencoderKL (SD-VAE, SDXL-VAE): four down blocks


def check_train_arguments(args: Mapping[str, Any], where: str = "reference arguments") -> None:
    """Refuse keys that are no ``train.py`` argument (a misspelt key would otherwise be
    ignored, building another model), each with the closest known key."""
    unknown = sorted(set(args) - TRAIN_ARGUMENTS)
    if unknown:
        named = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), TRAIN_ARGUMENTS, n=1)
            named.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown reference train.py arguments: {', '.join(named)}")


def read_yaml_arguments(path: str | pathlib.Path) -> dict[str, Any]:
    """The ``arguments:`` list of a reference YAML file as one mapping (only ``train.py``
    arguments)."""
    try:
        data = yaml.safe_load(pathlib.Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict) or "arguments" not in data:
        raise ConfigError(f"{path}: not a reference configuration (no top-level 'arguments:' list)")
    args: dict[str, Any] = {}
    for item in data["arguments"] or []:
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{path}: every entry of 'arguments' must be one 'key: value', got {item!r}")
        args.update(item)
    check_train_arguments(args, str(path))
    return args


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where it is."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def _int_list(v) -> list[int]:
    if isinstance(v, (list, tuple)):
        return [int(a) for a in v]
    if isinstance(v, int):
        return [v]
    return [int(a) for a in str(v).replace(",", " ").split()]


def train_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Reference ``train.py`` arguments with its defaults filled in (unknown keys are an error)."""
    check_train_arguments(args)
    out = dict(TRAIN_DEFAULTS)
    out.update(args)
    out["layers_per_block"] = _int_list(out["layers_per_block"])
    return out


def model_config_from_train_args(args: Mapping[str, Any], txt_dim: int | None = None) -> ModelConfig:
    """What ``train.py`` builds from its arguments: ``img_size`` divided by the VAE's factor,
    ``txt_dim`` the text encoder's hidden size (give ``txt_dim`` for encoders not in
    ``TEXT_ENCODER_DIMS``)."""
    a = train_args(args)
    if a.get("use_pretrained_lm"):
        raise ConfigError("use_pretrained_lm is not supported")
    if txt_dim is None:
        text = a.get("text")
        if a["txt_size"] and text:
            if text not in TEXT_ENCODER_DIMS:
                raise ConfigError(
                    f"unknown text encoder {text!r}: pass txt_dim explicitly (known: {sorted(TEXT_ENCODER_DIMS)})"
                )
            txt_dim = TEXT_ENCODER_DIMS[text]
        else:
            txt_dim = 0
    lpb = a["layers_per_block"]
    return ModelConfig(
        in_channels=int(a["channel_size"]),
        img_size=int(a["img_size"]) // vae_downsample_factor(a.get("vae")),
        patch_size=int(a["patch_size"]),
        channels=int(a["channels"]),
        num_blocks=int(a["blocks"]) if len(lpb) == 1 else len(lpb),
        layers_per_block=tuple(lpb),
        head_dim=int(a["head_dim"]),
        num_heads=a["num_heads"],
        num_kv_heads=a["num_kv_heads"],
        rope=bool(a["rope"]),
        pt_seq_len=a["pt_seq_len"],
        sos=bool(a["sos"]),
        txt_size=int(a["txt_size"]),
        txt_dim=int(txt_dim),
        cond_top_only=bool(a["cond_top_only"]),
        use_softplus=bool(a["use_softplus"]),
        use_swiglu=bool(a["use_swiglu"]),
        use_bias=bool(a["use_bias"]),
        use_qk_norm=bool(a["use_qk_norm"]),
        use_post_norm=bool(a["use_post_norm"]),
        use_final_norm=bool(a["use_final_norm"]),
        norm_type=str(a["norm_type"]),
        soft_clip=float(a["soft_clip"] or 0.0),
        seq_order=str(a["seq_order"]),
        learnable_self_denoiser=bool(a["learnable_self_denoiser"]),
        conditional_denoiser=bool(a["conditional_denoiser"]),
        temporal_causal=int(a["temporal_causal"]),
        top_block_channels=a["top_block_channels"],
        shallow_block_local=bool(a["shallow_block_local"]),
        denoiser_window=a["denoiser_window"],
        local_attn_window=a["local_attn_window"],
    )


def model_config_from_yaml(path: str | pathlib.Path, txt_dim: int | None = None) -> ModelConfig:
    return model_config_from_train_args(read_yaml_arguments(path), txt_dim=txt_dim)


# model options of ours that the reference's Model lacks; none of them changes the parameters
OURS_ONLY = (("rope_wrap", "spatial RoPE on a torus"), ("rope_content_keys", "keys at their token's position"))


def without_ours_only(cfg: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """``cfg`` with the options of ``OURS_ONLY`` switched off (the same parameters, the
    reference's positions) and the names of those that were on: the reference's nearest
    model, for same-budget comparisons of a recipe that uses them (``bench train --quality``)."""
    on = [key for key, _ in OURS_ONLY if getattr(cfg, key)]
    return ModelConfig.from_dict({**cfg.to_dict(), **{key: False for key in on}}), on


def check_reference_expressible(cfg: ModelConfig) -> None:
    """Raise a ``ConfigError`` when ``cfg`` uses an option the reference's ``Model`` lacks."""
    for key, what in OURS_ONLY:
        if getattr(cfg, key):
            raise ConfigError(
                f"model.{key}=True ({what}) has no counterpart in the reference's "
                "Model; such a model cannot be exported to or compared with it"
            )


def to_model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The reference ``Model(**kwargs)`` arguments for ``cfg`` (inverse of ``from_model_kwargs``)."""
    check_reference_expressible(cfg)
    d = cfg.to_dict()
    return {k: d[k] for k in sorted(MODEL_KWARGS)}


def to_yaml_arguments(cfg: ModelConfig) -> str:
    """``cfg`` in the reference's YAML format (an ``arguments:`` list of ``train.py`` flags).

    The flow's own (latent) ``img_size`` is written with no ``vae``, so that the reference
    builds the same ``Model``; ``txt_dim`` (which the reference takes from its
    text encoder) is written as a comment."""
    check_reference_expressible(cfg)
    items = [
        ("img_size", cfg.img_size),
        ("channel_size", cfg.in_channels),
        ("patch_size", cfg.patch_size),
        ("channels", cfg.channels),
        ("blocks", cfg.num_blocks),
        ("layers_per_block", " ".join(str(v) for v in cfg.layers_per_block)),
        ("head_dim", cfg.head_dim),
        ("num_heads", cfg.num_heads),
        ("num_kv_heads", cfg.num_kv_heads),
        ("rope", int(cfg.rope)),
        ("pt_seq_len", cfg.pt_seq_len),
        ("sos", int(cfg.sos)),
        ("txt_size", cfg.txt_size),
        ("cond_top_only", int(cfg.cond_top_only)),
        ("use_softplus", int(cfg.use_softplus)),
        ("use_swiglu", int(cfg.use_swiglu)),
        ("use_bias", int(cfg.use_bias)),
        ("use_qk_norm", int(cfg.use_qk_norm)),
        ("use_post_norm", int(cfg.use_post_norm)),
        ("use_final_norm", int(cfg.use_final_norm)),
        ("norm_type", cfg.norm_type),
        ("soft_clip", cfg.soft_clip),
        ("seq_order", cfg.seq_order),
        ("learnable_self_denoiser", int(cfg.learnable_self_denoiser)),
        ("conditional_denoiser", int(cfg.conditional_denoiser)),
        ("temporal_causal", cfg.temporal_causal),
        ("top_block_channels", cfg.top_block_channels),
        ("shallow_block_local", int(cfg.shallow_block_local)),
        ("denoiser_window", cfg.denoiser_window),
        ("local_attn_window", cfg.local_attn_window),
    ]
    lines = [f"# written by starflow-jax; the model reads text of width txt_dim={cfg.txt_dim}", "arguments:"]
    for k, v in items:
        if v is None:
            continue
        lines.append(f"- {k}: {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")
    return "\n".join(lines) + "\n"
