"""Benchmarks: timing after compilation, tables and JSON, the reference side by side."""
