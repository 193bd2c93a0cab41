"""A transformers T5 checkpoint (directory or state dict) to a ``T5Encoder``.

Only the encoder is read: the decoder and ``lm_head`` of a full T5 checkpoint are
ignored. Accepted key layouts are those of ``T5EncoderModel`` / ``T5Model`` /
``T5ForConditionalGeneration`` (``shared.weight``, ``encoder.block.{i}...``) and of a
bare ``T5Stack`` (``embed_tokens.weight``, ``block.{i}...``; what the reference keeps as
its text encoder). torch ``Linear`` weights ``(out, in)`` become our kernels ``(in, out)``;
per-layer tensors are stacked along the leading layer axis.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.interop.named_tensors import gather_named, to_numpy
from starflow_jax.text.t5 import T5Config, T5Encoder

EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")

# our parameter path (layer axis dropped) -> transformers name under ``block.{i}.``
_LAYER_NAMES = {
    ("attention_norm", "weight"): "layer.0.layer_norm.weight",
    ("attention", "q", "kernel"): "layer.0.SelfAttention.q.weight",
    ("attention", "k", "kernel"): "layer.0.SelfAttention.k.weight",
    ("attention", "v", "kernel"): "layer.0.SelfAttention.v.weight",
    ("attention", "o", "kernel"): "layer.0.SelfAttention.o.weight",
    ("ff_norm", "weight"): "layer.1.layer_norm.weight",
    ("ff", "wi_0", "kernel"): "layer.1.DenseReluDense.wi_0.weight",
    ("ff", "wi_1", "kernel"): "layer.1.DenseReluDense.wi_1.weight",
    ("ff", "wi", "kernel"): "layer.1.DenseReluDense.wi.weight",
    ("ff", "wo", "kernel"): "layer.1.DenseReluDense.wo.weight",
}
_TOP_NAMES = {
    ("embed_tokens", "embedding"): "encoder.embed_tokens.weight",
    ("relative_attention_bias",): "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ("final_layer_norm", "weight"): "encoder.final_layer_norm.weight",
}

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def transformers_names(path: tuple[str, ...], num_layers: int) -> list[tuple[str, int | None, bool]]:
    """transformers names (``encoder.`` layout) of one of our leaves: ``(name, layer
    index or None, transpose)`` for each piece."""
    transpose = path[-1] == "kernel"
    if path[0] == "layers":
        suffix = _LAYER_NAMES.get(path[1:])
        if suffix is None:
            raise KeyError(f"no transformers name for parameter {'.'.join(path)}")
        return [(f"encoder.block.{j}.{suffix}", j, transpose) for j in range(num_layers)]
    if path not in _TOP_NAMES:
        raise KeyError(f"no transformers name for parameter {'.'.join(path)}")
    return [(_TOP_NAMES[path], None, transpose)]


def encoder_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder entries of a transformers T5 state dict, renamed to the
    ``T5EncoderModel`` layout (``encoder.*``, embedding as ``encoder.embed_tokens.weight``);
    decoder and ``lm_head`` entries dropped. ``ValueError`` if ``shared.weight`` and
    ``encoder.embed_tokens.weight`` are both present and differ."""
    keys = list(state_dict)
    if any(k.startswith("encoder.") for k in keys) or "shared.weight" in state_dict:
        out = {
            k: v
            for k, v in state_dict.items()
            if not (k.startswith("decoder.") or k == "lm_head.weight" or k in EMBEDDING_KEYS)
        }
    else:  # a bare T5Stack
        out = {("encoder." + k): v for k, v in state_dict.items()}
        if "encoder.embed_tokens.weight" in out:
            return out
    present = [k for k in EMBEDDING_KEYS if k in state_dict]
    if len(present) == 2:
        a, b = (np.asarray(to_numpy(state_dict[k])) for k in present)
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ValueError(
                "the state dict has both shared.weight and encoder.embed_tokens.weight and they "
                "differ; the T5 encoder's embedding is tied to shared.weight"
            )
    if present:
        out["encoder.embed_tokens.weight"] = state_dict[present[0]]
    return out


def _wanted(name: str) -> bool:
    return not (name.startswith("decoder.") or name == "lm_head.weight")


def read_safetensors(path: str, keep: Callable[[str], bool] = _wanted) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file whose names pass ``keep``, as NumPy arrays
    (memory-mapped; bfloat16 included, which ``safetensors.numpy`` cannot read)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or not keep(name):
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _read_torch_bin(path: str, keep: Callable[[str], bool] = _wanted) -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch; install starflow-jax[torch] or use safetensors") from e
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: v for k, v in sd.items() if keep(k)}


def read_checkpoint_dir(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config.json dict, encoder-relevant tensors)`` of a transformers checkpoint
    directory: ``model.safetensors``, sharded safetensors with
    ``model.safetensors.index.json``, or ``pytorch_model.bin`` (sharded with its index)."""
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory (expected a transformers checkpoint directory)")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{path} has no config.json")
    with open(config_path) as f:
        config = json.load(f)
    candidates = [
        ("model.safetensors.index.json", read_safetensors),
        ("model.safetensors", read_safetensors),
        ("pytorch_model.bin.index.json", _read_torch_bin),
        ("pytorch_model.bin", _read_torch_bin),
    ]
    for name, reader in candidates:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            continue
        if not name.endswith(".index.json"):
            return config, reader(file)
        with open(file) as f:
            weight_map = json.load(f)["weight_map"]
        tensors: dict[str, Any] = {}
        for shard in sorted({s for k, s in weight_map.items() if _wanted(k)}):
            tensors.update(reader(os.path.join(path, shard)))
        return config, tensors
    raise ValueError(
        f"{path} has no weights: expected one of {[n for n, _ in candidates]}; found {sorted(os.listdir(path))}"
    )


def _resolve_config(
    config: T5Config | Mapping[str, Any] | Any | None, file_config: dict | None, dtype: str | None
) -> T5Config:
    if config is None:
        if file_config is None:
            raise ValueError(
                "converting an in-memory state dict needs config= (a T5Config or the checkpoint's config.json dict)"
            )
        config = file_config
    if not isinstance(config, T5Config):
        config = T5Config.from_transformers_config(config)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    return config


def t5_from_transformers(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    config: T5Config | Mapping[str, Any] | None = None,
    *,
    dtype: str | None = None,
) -> T5Encoder:
    """A ``T5Encoder`` with the weights of a transformers T5 checkpoint directory or of
    an in-memory state dict (torch tensors or arrays).

    ``config``: a ``T5Config``, a transformers config dict/object, or ``None`` to read the
    directory's ``config.json`` (required for a state dict). ``dtype`` overrides the
    compute dtype. Missing, unexpected, mis-shaped and non-finite encoder entries
    raise one ``StateDictMismatch`` (a ``ValueError``) listing them all."""
    file_config = None
    if isinstance(path_or_state_dict, Mapping):
        state_dict = path_or_state_dict
    else:
        file_config, state_dict = read_checkpoint_dir(os.fspath(path_or_state_dict))
    cfg = _resolve_config(config, file_config, dtype)
    sd = encoder_state_dict(state_dict)

    abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = [(tuple(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]
    arrays = gather_named(
        [(path, tuple(var.shape), var.dtype) for path, var in flat],
        lambda path, shape: transformers_names(path, cfg.num_layers),
        sd,
    )
    new_state = nnx.from_flat_state([(path, var.replace(jnp.asarray(arrays[path]))) for path, var in flat])
    return nnx.merge(graphdef, new_state)
