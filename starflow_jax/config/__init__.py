"""Model configuration, reference argument conversion and config-file loading."""

from starflow_jax.config.decoder_loss import DECODER_LOSS_DEFAULTS, decoder_loss_section
from starflow_jax.config.loader import apply_overrides, load_config, model_config, model_section
from starflow_jax.config.model_config import ConfigError, ModelConfig
from starflow_jax.config.training import (
    DATA_DEFAULTS,
    EVAL_DEFAULTS,
    MESH_DEFAULTS,
    SAMPLE_DEFAULTS,
    TRAIN_DEFAULTS,
    check_training_config,
    data_section,
    eval_section,
    mesh_section,
    sample_section,
    train_section,
    with_defaults,
)

__all__ = [
    "ConfigError",
    "DATA_DEFAULTS",
    "DECODER_LOSS_DEFAULTS",
    "EVAL_DEFAULTS",
    "MESH_DEFAULTS",
    "ModelConfig",
    "SAMPLE_DEFAULTS",
    "TRAIN_DEFAULTS",
    "apply_overrides",
    "check_training_config",
    "data_section",
    "decoder_loss_section",
    "eval_section",
    "load_config",
    "mesh_section",
    "model_config",
    "model_section",
    "sample_section",
    "train_section",
    "with_defaults",
]
