"""Reading the loss networks' torch weights: a ``.pth`` / ``.safetensors`` file or an
in-memory state dict, the keys a network does not use dropped, the rest filled into an
abstract NNX module by name (``fill_named_state``: one ``StateDictMismatch`` names every
missing, unexpected and mis-shaped tensor)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from starflow_jax.autoencoders.convert_vae import fill_named_state
from starflow_jax.interop.named_tensors import load_torch_file, to_numpy

# torch layouts -> ours: convolutions OIHW -> HWIO, linear (out, in) -> (in, out)
CONV = (2, 3, 1, 0)
LINEAR = True
SAME = False


def read_state_dict(path_or_state_dict, what: str) -> dict[str, np.ndarray]:
    """The state dict of ``path_or_state_dict`` (a file path, or a mapping of names to
    tensors); a missing file is a ``FileNotFoundError`` naming it and ``what`` it should hold."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: {path} does not exist")
        return load_torch_file(path)
    if not isinstance(path_or_state_dict, Mapping):
        raise TypeError(f"{what}: expected a file path or a state dict, got {type(path_or_state_dict).__name__}")
    return {k: to_numpy(v) for k, v in path_or_state_dict.items()}


def module_from_state_dict(
    make: Callable[[], nnx.Module], state_dict: Mapping[str, Any], torch_name: Callable[[tuple], tuple[str, Any]]
):
    """``make()``'s module (built abstractly, no random init) holding ``state_dict``'s
    tensors; ``torch_name(path)`` gives a parameter's ``(name, layout)``, the layout one of
    ``CONV``, ``LINEAR``, ``SAME`` or the axes taking torch's layout to ours."""
    abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)

    def names_of(path, shape):
        name, layout = torch_name(tuple(str(p) for p in path))
        return [(name, None, layout)]

    return nnx.merge(graphdef, fill_named_state(state, state_dict, names_of))
