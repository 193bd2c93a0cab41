"""Network layers: norms, RoPE, attention, MLP and scanned Transformer stacks."""
