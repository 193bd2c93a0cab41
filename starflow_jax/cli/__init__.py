"""The starflow-jax command line: one entry point, one module per subcommand."""
