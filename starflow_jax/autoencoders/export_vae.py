"""Our ``AutoencoderKL`` (SD-VAE) or ``AutoencoderKLWan`` (the Wan video VAE) written as a
diffusers model directory: ``config.json`` (the keys diffusers' ``save_pretrained`` writes
for that class) and ``diffusion_pytorch_model.safetensors`` (float32, torch layouts),
readable by ``diffusers.AutoencoderKL`` / ``diffusers.AutoencoderKLWan.from_pretrained`` and
by ``load_autoencoder``.

Names are the inverse of ``convert_vae``'s / ``convert_wan``'s: ``diffusers_name`` /
``wan_diffusers_name`` of each parameter path; convolution kernels HWIO -> OIHW (3D: DHWIO
-> OIDHW), dense kernels ``(in, out)`` -> ``(out, in)``; the Wan RMS norms' ``gamma`` ``(c,)``
-> ``(c, 1, 1)`` in attention blocks, ``(c, 1, 1, 1)`` elsewhere (diffusers' shapes). The
Wan VAE's temporal latent scale is ours, not diffusers': it is not written (pass it again as
``--vae DIR:SCALE``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import nnx

from starflow_jax.autoencoders.convert_vae import WEIGHTS_NAME, diffusers_name
from starflow_jax.autoencoders.convert_wan import wan_diffusers_name
from starflow_jax.autoencoders.vae import AutoencoderKL
from starflow_jax.autoencoders.wan_vae import AutoencoderKLWan

__all__ = [
    "diffusers_state_dict",
    "diffusers_config",
    "export_vae_to_diffusers",
    "wan_diffusers_state_dict",
    "wan_diffusers_config",
]

# The diffusers release whose AutoencoderKL config layout we write (recorded as
# ``_diffusers_version``; diffusers only reads it for information).
DIFFUSERS_VERSION = "0.30.0"
WAN_DIFFUSERS_VERSION = "0.33.0"  # the first release with AutoencoderKLWan


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


def _params(vae):
    for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        yield tuple(path), np.asarray(var.get_value() if hasattr(var, "get_value") else var, np.float32)


def wan_diffusers_state_dict(vae: AutoencoderKLWan) -> dict[str, np.ndarray]:
    """Every parameter of the Wan ``vae`` under its diffusers name, float32, torch layout."""
    out: dict[str, np.ndarray] = {}
    for path, a in _params(vae):
        name = wan_diffusers_name(path)
        if name in out:
            raise ValueError(f"two parameters map to the diffusers name {name!r}")
        if a.ndim == 5:  # DHWIO -> OIDHW
            a = a.transpose(4, 3, 0, 1, 2)
        elif a.ndim == 4:  # HWIO -> OIHW
            a = a.transpose(3, 2, 0, 1)
        elif name.endswith(".gamma"):  # WanRMS_norm: images=True in attention blocks
            a = a.reshape(a.shape + ((1, 1) if ".attentions." in name else (1, 1, 1)))
        out[name] = np.ascontiguousarray(a)
    return out


def wan_diffusers_config(vae: AutoencoderKLWan) -> dict[str, Any]:
    """The ``config.json`` dict diffusers writes for this ``AutoencoderKLWan``."""
    cfg = vae.cfg.to_diffusers_config()
    head = {"_class_name": "AutoencoderKLWan", "_diffusers_version": WAN_DIFFUSERS_VERSION}
    return {**head, **dict(sorted(cfg.items()))}


def diffusers_config(vae: AutoencoderKL) -> dict[str, Any]:
    """The ``config.json`` dict diffusers writes for this ``AutoencoderKL``."""
    cfg = vae.cfg.to_diffusers_config()
    if isinstance(cfg.get("sample_size"), tuple):
        cfg["sample_size"] = list(cfg["sample_size"])
    cfg.update(force_upcast=True, latents_mean=None, latents_std=None)
    head = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION}
    return {**head, **dict(sorted(cfg.items()))}


def export_vae_to_diffusers(vae: AutoencoderKL | AutoencoderKLWan, directory: str | os.PathLike) -> str:
    """Write ``vae`` as a diffusers ``AutoencoderKL`` (or, for our ``AutoencoderKLWan``, an
    ``AutoencoderKLWan``) directory; returns its path. The directory is created (parents
    too); an existing non-empty one is never overwritten."""
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
    if isinstance(vae, AutoencoderKLWan):
        state_dict, config = wan_diffusers_state_dict(vae), wan_diffusers_config(vae)
    elif isinstance(vae, AutoencoderKL):
        state_dict, config = diffusers_state_dict(vae), diffusers_config(vae)
    else:
        raise TypeError(f"vae must be an AutoencoderKL or AutoencoderKLWan, got {type(vae).__name__}")
    os.makedirs(directory, exist_ok=True)
    save_file(state_dict, os.path.join(directory, f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return directory
