"""Where a command's model comes from: a workdir, reference weights plus a config, or
(for smoke tests) random initialisation."""

from __future__ import annotations

import pathlib
import zipfile

import numpy as np
from flax import nnx

from starflow_jax.config import load_config, model_config
from starflow_jax.interop.named_tensors import StateDictFileError
from starflow_jax.interop.state_dict import load_reference_model
from starflow_jax.model import StarFlow


def add_arguments(p, allow_random: bool = False, required: bool = True) -> None:
    """The model's source: ``--weights``, ``--workdir`` or (``allow_random``) ``--random-init``;
    one of them is required unless ``required`` is false (the command checks then)."""
    p.add_argument(
        "--config",
        help="config file (configs/*.py, reference .yaml or Model-kwargs .json); "
        "with --weights" + (" / --random-init" if allow_random else ""),
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    src = p.add_mutually_exclusive_group(required=required)
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
        try:
            f = np.load(path)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise StateDictFileError(f"--weights {path}: not a readable .npz file: {e}") from e
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise StateDictFileError(f"--weights {path} holds one array, not named arrays (an .npz of reference names)")
        with f:
            return {
                k[len("param/") :] if k.startswith("param/") else k: f[k]
                for k in f.files
                if k != "meta" and (k.startswith("param/") or "/" not in k)
            }
    return path


def read_config(args):
    """The config of the model ``load_model`` builds, without reading any weights (for
    checks before any work)."""
    if getattr(args, "workdir", None):
        from starflow_jax.workdir.layout import read_workdir_config

        return read_workdir_config(args.workdir)
    if not args.config:
        raise ValueError("--config is required unless --workdir is given")
    return load_config(args.config, args.overrides)


def is_video_model(config, cfg) -> bool:
    """Whether the model has a temporal setup (it models clips, ``(n, t, c, h, w)``):
    time-causal attention, frame-local shallow blocks, or a config of clips
    (``data.num_frames`` / ``data.vid_size``, the reference's ``vid_size``)."""

    def given(section, key):
        return section in config and bool(config[section].get(key))

    return (
        cfg.is_video
        or cfg.shallow_block_local
        or given("data", "num_frames")
        or given("data", "vid_size")
        or given("reference", "vid_size")
    )


def load_model(args, seed: int = 0):
    """``(config, model)`` from the parsed arguments."""
    if getattr(args, "workdir", None):
        from starflow_jax.workdir.params import model_from_workdir

        return model_from_workdir(args.workdir, args.step, args.ema)
    config = read_config(args)
    cfg = model_config(config)
    if getattr(args, "random_init", False):
        return config, StarFlow(cfg, rngs=nnx.Rngs(seed))
    return config, load_reference_model(cfg, weights_source(args.weights))
