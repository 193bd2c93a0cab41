"""Model configuration, reference argument conversion and config-file loading."""
from starflow_jax.config.model_config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig"]
