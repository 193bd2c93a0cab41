"""Evaluation as the reference reports it: Fréchet distances and Inception Score on host
statistics (``frechet``), the FID Inception-v3 in Flax NNX (``inception``), and an offline
classifier of the embedded digits (``digits_classifier``)."""
