"""Weights of a diffusers ``AutoencoderKL`` into ``starflow_jax.autoencoders.AutoencoderKL``.

Our parameter paths are diffusers' state-dict names with ``kernel`` for ``weight``
and ``to_out`` for ``to_out.0``; convolution kernels are HWIO (torch: OIHW) and dense
kernels ``(in, out)`` (torch: ``(out, in)``). Checkpoints written before diffusers
renamed the attention (``query``/``key``/``value``/``proj_attn``, sometimes as 1x1
convolution weights) are read too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.autoencoders.vae import AutoencoderKL
from starflow_jax.autoencoders.vae_config import VAEConfig
from starflow_jax.interop.named_tensors import StateDictMismatch, gather_named

__all__ = [
    "vae_from_diffusers",
    "load_diffusers_checkpoint",
    "read_weights",
    "fill_state",
    "normalize_state_dict",
    "diffusers_name",
    "fill_named_state",
    "StateDictMismatch",
]

WEIGHTS_NAME = "diffusion_pytorch_model"
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")


def diffusers_name(path: tuple, renames: Mapping[str, str] | None = None) -> str:
    """The diffusers state-dict name of one of our parameters (given its nnx path):
    module names in ``renames`` (default: the SD-VAE's ``to_out`` -> ``to_out.0``) replaced,
    ``kernel`` -> ``weight``."""
    renames = {"to_out": "to_out.0"} if renames is None else renames
    parts = [str(p) for p in path]
    parts = [renames.get(p, p) for p in parts[:-1]] + [parts[-1]]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def _as_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu()
        if str(v.dtype) in ("torch.bfloat16", "torch.float16"):
            v = v.float()
        return v.numpy()
    a = np.asarray(v)  # NumPy, JAX (bfloat16 comes as ml_dtypes' kind "V")
    return a.astype(np.float32) if a.dtype.kind in "fV" and a.dtype.itemsize < 4 else a


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """NumPy arrays under current diffusers names: deprecated attention names renamed
    (unless the new name is also present: then both stay, and the old one is reported
    as unexpected) and 1x1-convolution attention weights ``(c, c, 1, 1)`` squeezed."""
    out = {k: _as_numpy(v) for k, v in state_dict.items()}
    for key in list(out):
        m = _ATTN_KEY.match(key)
        if m is None:
            continue
        prefix, proj, kind = m.groups()
        new = f"{prefix}.{_DEPRECATED_ATTN.get(proj, proj)}.{kind}"
        arr = out[key]
        if kind == "weight" and arr.ndim == 4 and arr.shape[2:] == (1, 1):
            arr = arr[:, :, 0, 0]
        if new != key and new in out:
            continue
        del out[key]
        out[new] = arr
    return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - safetensors is a dependency
        raise ImportError("reading .safetensors needs the 'safetensors' package") from e
    try:
        return dict(load_file(path))
    except TypeError:  # bfloat16, which NumPy cannot name: read through JAX (ml_dtypes)
        from safetensors.flax import load_file as load_jax

        return {k: np.asarray(v).astype(np.float32) for k, v in load_jax(path).items()}


def _read_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs torch; install starflow-jax[torch] (or convert the checkpoint to safetensors)"
        ) from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: _as_numpy(v) for k, v in sd.items()}


def read_weights(path: str) -> dict[str, np.ndarray]:
    """A ``.safetensors`` or ``.bin`` weights file, or a sharded checkpoint's
    ``*.index.json`` (every shard it names)."""
    path = str(path)
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(read_weights(os.path.join(os.path.dirname(path), shard)))
        return out
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return _read_bin(path)
    raise ValueError(f"unknown weights file type {path!r} (expected .safetensors, .bin or .index.json)")


def load_diffusers_checkpoint(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config dict, state dict)`` of a diffusers ``AutoencoderKL`` directory (as written
    by ``save_pretrained``): ``config.json`` plus ``diffusion_pytorch_model.safetensors``
    (preferred), its sharded index, or ``diffusion_pytorch_model.bin``."""
    directory = str(directory)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} has no config.json: not a diffusers model directory")
    with open(config_path) as f:
        config = json.load(f)
    for name in (
        f"{WEIGHTS_NAME}.safetensors",
        f"{WEIGHTS_NAME}.safetensors.index.json",
        f"{WEIGHTS_NAME}.bin",
        f"{WEIGHTS_NAME}.bin.index.json",
    ):
        if os.path.isfile(os.path.join(directory, name)):
            return config, read_weights(os.path.join(directory, name))
    raise FileNotFoundError(
        f"{directory!r} has no {WEIGHTS_NAME}.safetensors or {WEIGHTS_NAME}.bin "
        f"(found: {sorted(os.listdir(directory))})"
    )


def _resolve_config(config, dtype: str | None) -> VAEConfig:
    extra = {} if dtype is None else {"dtype": dtype}
    if isinstance(config, VAEConfig):
        return dataclasses.replace(config, **extra)
    if isinstance(config, Mapping):
        return VAEConfig.from_diffusers_config(config, **extra)
    raise TypeError(f"config must be a diffusers config dict or a VAEConfig, got {type(config).__name__}")


def fill_state(state: nnx.State, state_dict: Mapping[str, Any], *, check_finite: bool = True) -> nnx.State:
    """Our (possibly abstract) parameter state filled from a diffusers state dict; raises one
    ``StateDictMismatch`` listing missing, unexpected, mis-shaped and non-finite keys."""

    def names_of(path, shape):
        layout = {4: (2, 3, 1, 0), 2: True}.get(len(shape), False)  # OIHW -> HWIO, (out, in) -> (in, out)
        return [(diffusers_name(path), None, layout)]

    return fill_named_state(state, normalize_state_dict(state_dict), names_of, check_finite=check_finite)


def fill_named_state(
    state: nnx.State, state_dict: Mapping[str, Any], names_of, *, check_finite: bool = True
) -> nnx.State:
    """``state`` (possibly abstract) filled through ``gather_named`` from ``state_dict``,
    ``names_of(path, shape)`` giving each leaf's source name and layout; one
    ``StateDictMismatch`` lists every missing, unexpected, mis-shaped and non-finite key."""
    flat = [(tuple(p), v) for p, v in nnx.to_flat_state(state)]

    def leaf(var):
        return var.get_value() if hasattr(var, "get_value") else var

    arrays = gather_named(
        [(path, tuple(leaf(var).shape), leaf(var).dtype) for path, var in flat],
        names_of,
        state_dict,
        check_finite=check_finite,
    )
    return nnx.from_flat_state(
        [
            (path, var.replace(jnp.asarray(arrays[path])) if hasattr(var, "replace") else jnp.asarray(arrays[path]))
            for path, var in flat
        ]
    )


def vae_from_diffusers(
    path_or_state_dict, config=None, *, dtype: str | None = None, check_finite: bool = True
) -> AutoencoderKL:
    """An ``AutoencoderKL`` holding the weights of a diffusers ``AutoencoderKL``.

    ``path_or_state_dict``: a diffusers model directory (``config.json`` + weights), or a
    mapping of diffusers names to arrays (NumPy, JAX or torch tensors; e.g.
    ``model.state_dict()``), then ``config`` is required. ``config``: a diffusers config
    dict (``model.config``) or a ``VAEConfig``; for a directory it replaces its
    ``config.json``. ``dtype`` sets the compute dtype (parameters stay float32). The model
    is built abstractly (no random initialisation) and filled."""
    if isinstance(path_or_state_dict, Mapping):
        state_dict = path_or_state_dict
        if config is None:
            raise ValueError(
                "converting an in-memory state dict needs its config (a diffusers config dict or a VAEConfig)"
            )
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        file_config, state_dict = load_diffusers_checkpoint(os.fspath(path_or_state_dict))
        config = file_config if config is None else config
    else:
        raise TypeError(
            "path_or_state_dict must be a diffusers model directory or a state dict mapping, "
            f"got {type(path_or_state_dict).__name__}"
        )
    cfg = _resolve_config(config, dtype)
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, fill_state(state, state_dict, check_finite=check_finite))
