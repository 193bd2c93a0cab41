"""Weights of a diffusers ``AutoencoderKLWan`` into ``starflow_jax.autoencoders.AutoencoderKLWan``.

Our parameter paths are diffusers' state-dict names with ``kernel`` for ``weight`` and
``resample`` for a resampler's spatial convolution ``resample.1``. Convolution kernels are
channels-last: 3D ``DHWIO`` (torch: ``OIDHW``), 2D ``HWIO`` (torch: ``OIHW``); the RMS norms'
``gamma`` is ``(c,)`` (torch: ``(c, 1, 1, 1)`` or ``(c, 1, 1)``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from flax import nnx

from starflow_jax.autoencoders.convert_vae import diffusers_name, fill_named_state, load_diffusers_checkpoint
from starflow_jax.autoencoders.wan_config import WanVAEConfig
from starflow_jax.autoencoders.wan_vae import AutoencoderKLWan
from starflow_jax.interop.named_tensors import StateDictMismatch

__all__ = ["wan_from_diffusers", "fill_wan_state", "wan_diffusers_name", "StateDictMismatch"]

_LAYOUT = {5: (2, 3, 4, 1, 0), 4: (2, 3, 1, 0)}  # torch conv weight -> our kernel


def wan_diffusers_name(path: tuple) -> str:
    """The diffusers state-dict name of one of our parameters (given its nnx path)."""
    return diffusers_name(path, {"resample": "resample.1"})


def _squeeze_gammas(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers stores the RMS norms' gamma as ``(c, 1, 1[, 1])``; ours is ``(c,)``."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        shape = tuple(getattr(value, "shape", ()))
        if key.endswith(".gamma") and len(shape) > 1 and all(s == 1 for s in shape[1:]):
            out[key] = value.reshape(shape[0])
    return out


def fill_wan_state(state: nnx.State, state_dict: Mapping[str, Any], *, check_finite: bool = True) -> nnx.State:
    """Our (possibly abstract) parameter state filled from a diffusers state dict; raises one
    ``StateDictMismatch`` listing missing, unexpected, mis-shaped and non-finite keys."""

    def names_of(path, shape):
        return [(wan_diffusers_name(path), None, _LAYOUT.get(len(shape), False))]

    return fill_named_state(state, _squeeze_gammas(state_dict), names_of, check_finite=check_finite)


def _resolve_config(config, overrides: dict) -> WanVAEConfig:
    if isinstance(config, WanVAEConfig):
        return dataclasses.replace(config, **overrides)
    if isinstance(config, Mapping):
        return WanVAEConfig.from_diffusers_config(config, **overrides)
    raise TypeError(f"config must be a diffusers config dict or a WanVAEConfig, got {type(config).__name__}")


def wan_from_diffusers(
    source,
    config=None,
    *,
    dtype: str | None = None,
    temporal_latent_scale: float | None = None,
    check_finite: bool = True,
) -> AutoencoderKLWan:
    """An ``AutoencoderKLWan`` holding the weights of a diffusers ``AutoencoderKLWan``.

    ``source``: a diffusers model directory (``config.json`` + weights, as written by
    ``save_pretrained``; for a pipeline, its ``vae`` subfolder), a loaded diffusers model (a
    torch module with ``.config`` and ``.state_dict()``), or a mapping of diffusers names to
    arrays (NumPy, JAX or torch tensors), then ``config`` is required. ``config``: a diffusers
    config dict or a ``WanVAEConfig``; it replaces the source's own. ``dtype`` sets the compute
    dtype (parameters stay float32); ``temporal_latent_scale`` the reference's scale of latent
    frames after the first (e.g. 0.6 for ``Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6``). The model is
    built abstractly (no random initialisation) and filled; a state dict that does not fit the
    configuration raises one ``StateDictMismatch`` listing every problem."""
    if isinstance(source, Mapping):
        state_dict = source
        if config is None:
            raise ValueError(
                "converting an in-memory state dict needs its config (a diffusers config dict or a WanVAEConfig)"
            )
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "vae")):
            path = os.path.join(path, "vae")
        file_config, state_dict = load_diffusers_checkpoint(path)
        if config is None and file_config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
            raise ValueError(f"{path!r} holds a {file_config['_class_name']}, not an AutoencoderKLWan")
        config = file_config if config is None else config
    elif hasattr(source, "state_dict") and hasattr(source, "config"):
        state_dict = source.state_dict()
        config = dict(source.config) if config is None else config
    else:
        raise TypeError(
            "source must be a diffusers model directory, a diffusers AutoencoderKLWan or a state "
            f"dict mapping, got {type(source).__name__}"
        )
    overrides = {k: v for k, v in (("dtype", dtype), ("temporal_latent_scale", temporal_latent_scale)) if v is not None}
    cfg = _resolve_config(config, overrides)
    abstract = nnx.eval_shape(lambda: AutoencoderKLWan(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, fill_wan_state(state, state_dict, check_finite=check_finite))
