"""The text encoder of text-to-image models: the T5 encoder in Flax NNX (t5.py), its
weights from a transformers checkpoint (convert_t5.py) and the reference's prompt
templates, tokenisation and masking (prompts.py). transformers and sentencepiece are
needed only for tokenisation (the ``text`` extra); torch only for ``pytorch_model.bin``."""

from starflow_jax.text.convert_t5 import read_checkpoint_dir, t5_from_transformers
from starflow_jax.text.prompts import (
    encode_prompts,
    encode_tokens,
    load_tokenizer,
    null_embedding,
    prepare_prompts,
    tokenize,
)
from starflow_jax.text.t5 import T5Config, T5Encoder, relative_position_buckets

__all__ = [
    "T5Config",
    "T5Encoder",
    "relative_position_buckets",
    "t5_from_transformers",
    "read_checkpoint_dir",
    "load_tokenizer",
    "prepare_prompts",
    "tokenize",
    "encode_tokens",
    "encode_prompts",
    "null_embedding",
]
