"""Model configuration, reference argument conversion and config-file loading."""
from starflow_jax.config.loader import apply_overrides, load_config, model_config, model_section
from starflow_jax.config.model_config import ConfigError, ModelConfig
from starflow_jax.config.training import TRAIN_DEFAULTS, check_training_config, train_section

__all__ = ["ConfigError", "ModelConfig", "TRAIN_DEFAULTS", "apply_overrides", "check_training_config", "load_config",
           "model_config", "model_section", "train_section"]
