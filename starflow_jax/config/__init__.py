"""Model configuration, reference argument conversion and config-file loading."""
from starflow_jax.config.loader import apply_overrides, load_config, model_config, model_section
from starflow_jax.config.model_config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig", "apply_overrides", "load_config", "model_config", "model_section"]
