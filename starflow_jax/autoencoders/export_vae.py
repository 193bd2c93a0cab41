"""Our ``AutoencoderKL`` written as a diffusers model directory: ``config.json`` (the keys
diffusers' ``save_pretrained`` writes for an ``AutoencoderKL``) and
``diffusion_pytorch_model.safetensors`` (float32, torch layouts), readable by
``diffusers.AutoencoderKL.from_pretrained`` and by ``vae_from_diffusers``.

Names are the inverse of ``convert_vae``'s: ``diffusers_name`` of each parameter path;
convolution kernels HWIO -> OIHW, dense kernels ``(in, out)`` -> ``(out, in)``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import nnx

from starflow_jax.autoencoders.convert_vae import WEIGHTS_NAME, diffusers_name
from starflow_jax.autoencoders.vae import AutoencoderKL

__all__ = ["diffusers_state_dict", "diffusers_config", "export_vae_to_diffusers"]

# The diffusers release whose AutoencoderKL config layout we write (recorded as
# ``_diffusers_version``; diffusers only reads it for information).
DIFFUSERS_VERSION = "0.30.0"


def _torch_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:  # HWIO -> OIHW
        a = a.transpose(3, 2, 0, 1)
    elif a.ndim == 2:  # (in, out) -> (out, in)
        a = a.T
    return np.ascontiguousarray(a)


def diffusers_state_dict(vae: AutoencoderKL) -> dict[str, np.ndarray]:
    """Every parameter of ``vae`` under its diffusers name, float32, in torch layout."""
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        value = var.get_value() if hasattr(var, "get_value") else var
        name = diffusers_name(tuple(path))
        if name in out:
            raise ValueError(f"two parameters map to the diffusers name {name!r}")
        out[name] = _torch_layout(np.asarray(value, np.float32))
    return out


def diffusers_config(vae: AutoencoderKL) -> dict[str, Any]:
    """The ``config.json`` dict diffusers writes for this ``AutoencoderKL``."""
    cfg = vae.cfg.to_diffusers_config()
    if isinstance(cfg.get("sample_size"), tuple):
        cfg["sample_size"] = list(cfg["sample_size"])
    cfg.update(force_upcast=True, latents_mean=None, latents_std=None)
    head = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION}
    return {**head, **dict(sorted(cfg.items()))}


def export_vae_to_diffusers(vae: AutoencoderKL, directory: str | os.PathLike) -> str:
    """Write ``vae`` as a diffusers ``AutoencoderKL`` directory; returns its path. The
    directory is created (parents too); an existing non-empty one is never overwritten."""
    try:
        from safetensors.numpy import save_file
    except ImportError as e:  # pragma: no cover - safetensors is a dependency
        raise ImportError("writing the VAE needs the 'safetensors' package") from e
    directory = os.fspath(directory)
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise FileExistsError(f"{directory!r} exists and is not a directory; not overwriting it")
        if os.listdir(directory):
            raise FileExistsError(
                f"{directory!r} exists and is not empty ({sorted(os.listdir(directory))[:5]}); "
                "not overwriting it: choose another directory or remove it"
            )
    state_dict = diffusers_state_dict(vae)
    config = diffusers_config(vae)
    os.makedirs(directory, exist_ok=True)
    save_file(state_dict, os.path.join(directory, f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return directory
