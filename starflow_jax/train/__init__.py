"""Training: objective, optimizer, the pure train step, the loop."""
