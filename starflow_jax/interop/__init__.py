"""Interop with the PyTorch reference: configurations and state dicts."""
