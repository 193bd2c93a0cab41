"""starflow-jax: STARFlow and STARFlow-V (Transformer Autoregressive Flows) in JAX/Flax."""

__version__ = "0.1.0"
