"""Running the PyTorch reference (a checkout of apple/ml-starflow, torch installed) on the
same configuration and weights, for side-by-side benchmarks. Nothing of the reference
is copied: its module is imported from the checkout the user points at."""

from __future__ import annotations

import importlib
import os
import pathlib
import socket
import sys

import numpy as np

from starflow_jax.config.model_config import ModelConfig
from starflow_jax.config.reference_args import to_model_kwargs
from starflow_jax.interop.state_dict import reference_buffers, to_reference


def import_reference(path: str | os.PathLike):
    """``transformer_flow`` from a reference checkout."""
    root = pathlib.Path(path).resolve()
    if not (root / "transformer_flow.py").exists():
        raise FileNotFoundError(f"{root} is not a checkout of apple/ml-starflow (no transformer_flow.py)")
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ImportError("--reference needs torch installed (pip install -e '.[torch]') and einops, tqdm") from e
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("transformer_flow")


def ensure_process_group() -> None:
    """The reference's Jacobi sampler all-reduces its stopping flag: a one-process gloo group."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def reference_model(tf, cfg: ModelConfig, params_state):
    """The reference ``Model`` with our weights, loaded with ``strict=True``."""
    import torch

    model = tf.Model(**to_model_kwargs(cfg))
    sd = to_reference(params_state)
    sd.update(reference_buffers(cfg))
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    return model.eval()


def count_passes(model) -> dict:
    """Install hooks counting transformer passes over tokens (text prefill excluded)."""
    counter = {"passes": 0}

    def hook(module, args, kwargs=None):
        if args and args[0] is not None:
            counter["passes"] += 1

    for block in model.blocks:
        layers = getattr(block, "attn_blocks", None)
        if layers is not None and len(layers) > 0:
            layers[0].register_forward_pre_hook(hook)
    return counter


def reference_loss(tf, cfg: ModelConfig, state_dict_path: str, x: np.ndarray, y: np.ndarray | None):
    """The reference ``Model`` loaded from a ``.pth`` with ``strict=True``: its per-example
    NLL (float64 numpy) of ``x`` (the reference's ``get_loss`` before the batch mean)."""
    import torch

    model = tf.Model(**to_model_kwargs(cfg))
    sd = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    model.eval()
    with torch.no_grad():
        xt = torch.from_numpy(np.asarray(x, np.float32))
        yt = None if y is None else torch.from_numpy(np.asarray(y, np.float32))
        z, _, _, logdets = model(xt, yt)
        per = 0.5 * z.pow(2).mean(dim=tuple(range(1, z.dim())))
        for ld in logdets:
            per = per - (ld.mean(dim=tuple(range(1, ld.dim()))) if ld.dim() > 1 else ld)
    return per.double().numpy()
