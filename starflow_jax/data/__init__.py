"""Input data: the embedded digits, grain pipelines."""
