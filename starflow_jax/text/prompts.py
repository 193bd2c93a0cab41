"""Prompts to text embeddings the way the reference does it.

The reference (``utils/common.py``: ``preprocess_text`` and ``encode_text``) rewrites
every caption with templates for the frame rate, the noise level and the aspect ratio,
tokenises with ``padding='max_length', truncation=True, max_length=txt_size`` and
multiplies the encoder's last hidden state by the attention mask, so that padded
positions are exactly zero. The guidance ("null") caption is the empty string, which
goes through the same templates (``sample.py``: ``y += [""] * len(y)`` before
``encode_text``).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.text.t5 import T5Encoder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")

# The reference's chat template; it only applies it for its Gemma embedding-table encoder,
# never for T5 (``use_template=isinstance(text_encoder, TextEmbedder)``).
CHAT_TEMPLATE = "<start_of_turn>user\nPlease generate {mode} about: {prompt}<end_of_turn>\n<start_of_turn>model\n"


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer stored in a checkpoint directory (``transformers.AutoTokenizer``,
    local files only: nothing is downloaded)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(
            f"tokenizer directory {path} does not exist (a local checkpoint directory is needed; nothing is downloaded)"
        )
    present = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(path, f))]
    if not present:
        raise ValueError(
            f"{path} has no tokenizer files: expected some of {list(TOKENIZER_FILES)}, found {sorted(os.listdir(path))}"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError("tokenisation needs transformers and sentencepiece; install starflow-jax[text]") from e
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer in {path} (files there: {present}): {e}") from e


def _per_prompt(value: Any, n: int, name: str) -> list:
    """A scalar repeated ``n`` times, or a sequence / array of ``n`` values."""
    if np.ndim(value) == 0:
        return [np.asarray(value).item()] * n
    values = np.asarray(value).reshape(-1).tolist()
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} prompts")
    return values


def prepare_prompts(
    prompts: Sequence[str],
    *,
    aspect_ratio: str | None = None,
    fps: int | Sequence[int] | None = None,
    noise_std: float | Sequence[float] | None = None,
    use_template: bool = False,
) -> list[str]:
    """The reference's ``preprocess_text``: for each prompt ``txt``,

    - ``fps``: ``"A video with {fps} fps:\\n{txt}\\n"`` if ``fps > 0`` else ``"An image:\\n{txt}\\n"``;
    - then ``noise_std``: ``"Noise Level {int(noise_std * 1000)}:\\n{txt}"``;
    - then ``aspect_ratio`` (e.g. ``"16:9"``): ``"{txt}\\n in a {aspect_ratio} aspect ratio.\\n"``;
    - then, with ``use_template`` (the reference's Gemma path only), the chat template.

    ``fps`` and ``noise_std`` are one value for all prompts or one per prompt (the
    reference's tensor path: ``int(f)`` and ``int(n * 1000)`` of each)."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, not a single string")
    text = list(prompts)
    if not all(isinstance(t, str) for t in text):
        raise ValueError("prompts must all be strings")
    modes = ["an image"] * len(text)
    if fps is not None:
        if isinstance(fps, bool):
            raise ValueError(f"fps must be an integer or a sequence of integers, got {fps!r}")
        fps_list = [int(f) for f in _per_prompt(fps, len(text), "fps")]
        modes = ["a video" if f > 0 else "an image" for f in fps_list]
        text = [f"A video with {f} fps:\n{txt}\n" if f > 0 else f"An image:\n{txt}\n" for txt, f in zip(text, fps_list)]
    if noise_std is not None:
        if isinstance(noise_std, numbers.Real) and not isinstance(noise_std, bool):
            levels = [int(float(noise_std) * 1000)] * len(text)
        else:
            levels = [int(n * 1000) for n in _per_prompt(noise_std, len(text), "noise_std")]
        text = [f"Noise Level {n}:\n{txt}" for n, txt in zip(levels, text)]
    if aspect_ratio is not None:
        if not isinstance(aspect_ratio, str):
            raise ValueError(f"aspect_ratio must be a string such as '16:9', got {aspect_ratio!r}")
        text = [f"{txt}\n in a {aspect_ratio} aspect ratio.\n" for txt in text]
    if use_template:
        text = [CHAT_TEMPLATE.format(prompt=txt, mode=mode) for txt, mode in zip(text, modes)]
    return text


def tokenize(tokenizer: Any, texts: Sequence[str], txt_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, both ``(b, txt_size)`` int32: truncated and padded
    to ``txt_size`` exactly like the reference's tokenizer call."""
    if isinstance(txt_size, bool) or not isinstance(txt_size, int) or txt_size < 1:
        raise ValueError(f"txt_size must be a positive integer, got {txt_size!r}")
    out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=txt_size, return_tensors="np")
    ids, mask = np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32)
    if ids.shape != (len(texts), txt_size):
        raise ValueError(f"the tokenizer returned ids of shape {ids.shape}, expected {(len(texts), txt_size)}")
    return ids, mask


@nnx.jit
def _encode_masked(encoder: T5Encoder, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    hidden = encoder(input_ids, attention_mask)
    return hidden * attention_mask[..., None].astype(hidden.dtype)


def encode_tokens(encoder: T5Encoder, input_ids: Any, attention_mask: Any) -> jax.Array:
    """Hidden states of the tokens (jitted), zero at padded positions."""
    ids, mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
    vocab = encoder.config.vocab_size
    if ids.size and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(
            f"token ids outside the encoder's vocabulary [0, {vocab}): the tokenizer does not belong to this encoder"
        )
    return _encode_masked(encoder, ids, mask)


def encode_prompts(
    encoder: T5Encoder,
    tokenizer: Any,
    prompts: Sequence[str],
    txt_size: int,
    *,
    aspect_ratio: str | None = None,
    fps: int | Sequence[int] | None = None,
    noise_std: float | Sequence[float] | None = None,
) -> jax.Array:
    """The reference's ``encode_text`` for a T5 encoder: templates (``prepare_prompts``),
    tokens padded/truncated to ``txt_size``, encoder hidden states with the padded
    positions zeroed; ``(b, txt_size, d_model)`` float32."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    texts = prepare_prompts(prompts, aspect_ratio=aspect_ratio, fps=fps, noise_std=noise_std)
    ids, mask = tokenize(tokenizer, texts, txt_size)
    return encode_tokens(encoder, ids, mask)


def null_embedding(
    encoder: T5Encoder,
    tokenizer: Any,
    txt_size: int,
    *,
    batch_size: int = 1,
    aspect_ratio: str | None = None,
    fps: int | Sequence[int] | None = None,
    noise_std: float | Sequence[float] | None = None,
) -> jax.Array:
    """The embedding of the empty caption that the reference uses as the unconditional
    half under classifier-free guidance (and for dropped captions in training): ``""``
    through the same templates and encoder; ``(batch_size, txt_size, d_model)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return encode_prompts(
        encoder, tokenizer, [""] * batch_size, txt_size, aspect_ratio=aspect_ratio, fps=fps, noise_std=noise_std
    )
