"""Where a command's model comes from: a workdir, reference weights plus a config, or
(for smoke tests) random initialisation."""
from __future__ import annotations

import pathlib

import numpy as np
from flax import nnx

from starflow_jax.config import load_config, model_config
from starflow_jax.interop.state_dict import load_reference_model
from starflow_jax.model import StarFlow


def add_arguments(p, allow_random: bool = False) -> None:
    p.add_argument("--config", help="config file (configs/*.py, reference .yaml or Model-kwargs .json); "
                                    "with --weights" + (" / --random-init" if allow_random else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="reference state dict: .pth (torch), .safetensors, or .npz of reference names")
    src.add_argument("--workdir", help="a starflow-jax workdir (training checkpoints or imported parameters)")
    if allow_random:
        src.add_argument("--random-init", action="store_true", help="a randomly initialised model (smoke tests)")
    p.add_argument("--step", type=int, default=None, help="with --workdir: checkpoint step (default latest)")
    p.add_argument("--ema", action="store_true", help="with --workdir: the EMA parameters")


def weights_source(path: str):
    """A ``.npz`` of reference names (e.g. a parity case's ``param/*``) as a mapping; other
    paths are read by ``load_reference_model``."""
    if not pathlib.Path(path).exists():
        raise FileNotFoundError(f"--weights {path} does not exist")
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k[len("param/"):] if k.startswith("param/") else k: f[k] for k in f.files
                    if k != "meta" and (k.startswith("param/") or "/" not in k)}
    return path


def load_model(args, seed: int = 0):
    """``(config, model)`` from the parsed arguments."""
    if getattr(args, "workdir", None):
        from starflow_jax.interop.checkpoints import model_from_workdir

        return model_from_workdir(args.workdir, args.step, args.ema)
    if not args.config:
        raise ValueError("--config is required unless --workdir is given")
    config = load_config(args.config, args.overrides)
    cfg = model_config(config)
    if getattr(args, "random_init", False):
        return config, StarFlow(cfg, rngs=nnx.Rngs(seed))
    return config, load_reference_model(cfg, weights_source(args.weights))
