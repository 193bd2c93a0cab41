"""Parameter names both ways between this model and the PyTorch reference's
``transformer_flow.Model.state_dict()``.

Our parameters are an ``nnx.State`` whose Transformer layers are stacked along a
leading axis and whose dense kernels are ``(in, out)``; the reference has one
entry per layer (``blocks.2.attn_blocks.5.attention.qkv.weight``) and torch's
``(out, in)`` weights. The mapping is a pure renaming plus transposes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from starflow_jax.config.model_config import ModelConfig
from starflow_jax.interop.named_tensors import gather_named, load_torch_file
from starflow_jax.model import StarFlow
from starflow_jax.tree_paths import path_names

# Our module names that differ from the reference's.
_RENAME = {"fc1": "main.0", "fc2": "main.2", "kernel": "weight"}
_RENAME_BACK = {"main.0": "fc1", "main.2": "fc2"}
STACK = "attn_blocks"


def is_deprecated_buffer(name: str) -> bool:
    """Buffers the reference keeps for old checkpoints; they carry no information."""
    return (
        name.endswith(".attn_mask")
        or name in ("var", "feat_rope.freqs_cos", "feat_rope.freqs_sin")
        or name.startswith("feat_rope_gen.")
    )


def reference_names(path: tuple, shape: tuple[int, ...]) -> list[tuple[str, Any]]:
    """Reference names for one of our leaves and, for each, how to slice it: a list of
    ``(name, (layer_index or None, transpose))``."""
    parts = path_names(path)
    transpose = parts[-1] == "kernel"
    parts = [_RENAME.get(p, p) for p in parts]
    if STACK in parts:
        i = parts.index(STACK)
        head, tail = parts[: i + 1], parts[i + 1 :]
        return [(".".join(head + [str(j)] + tail), (j, transpose)) for j in range(shape[0])]
    return [(".".join(parts), (None, transpose))]


def _flat_params(state: nnx.State) -> list[tuple[tuple, Any]]:
    return [(tuple(p), v) for p, v in nnx.to_flat_state(state)]


def _value(v):
    return v.get_value() if hasattr(v, "get_value") else v


def to_reference(state: nnx.State, release: bool = False) -> dict[str, np.ndarray]:
    """Our parameter state to reference names and layouts (NumPy arrays, same dtype).

    Leaf by leaf; with ``release`` each device array is deleted as soon as it has been
    copied out, so that the conversion never holds two full copies of the parameters."""
    out = {}
    for path, var in _flat_params(state):
        value = _value(var)
        arr = np.array(jax.device_get(value))
        if release and isinstance(value, jax.Array):
            value.delete()
        for name, (layer, transpose) in reference_names(path, arr.shape):
            a = arr[layer] if layer is not None else arr
            out[name] = np.ascontiguousarray(a.T) if transpose else np.ascontiguousarray(a)
        del arr
    return out


def expected_reference_shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
    """Reference name to the shape the reference has, from our (possibly abstract) state."""
    shapes = {}
    for path, var in _flat_params(state):
        shape = tuple(_value(var).shape)
        for name, (layer, transpose) in reference_names(path, shape):
            s = shape[1:] if layer is not None else shape
            shapes[name] = tuple(reversed(s)) if transpose else tuple(s)
    return shapes


def from_reference(
    state: nnx.State, state_dict: Mapping[str, Any], *, check_finite: bool = True, report: list | None = None
) -> nnx.State:
    """Fill ``state`` (concrete or abstract, e.g. from ``nnx.eval_shape``) with the
    reference state dict's values; returns a new state.

    Deprecated buffers are ignored (their names are appended to ``report`` when
    given). Anything else that does not fit raises one ``StateDictMismatch``
    listing missing, unexpected, mis-shaped and non-finite keys."""
    sd = {}
    ignored = []
    for k, v in state_dict.items():
        if is_deprecated_buffer(k):
            ignored.append(k)
        else:
            sd[k] = v
    if report is not None:
        report.extend(sorted(ignored))
    flat = _flat_params(state)
    arrays = gather_named(
        [(path, tuple(_value(var).shape), _value(var).dtype) for path, var in flat],
        lambda path, shape: [(n, layer, t) for n, (layer, t) in reference_names(path, shape)],
        sd,
        check_finite=check_finite,
    )
    leaves = []
    for path, var in flat:
        leaves.append(
            (
                path,
                var.replace(jax.numpy.asarray(arrays[path]))
                if hasattr(var, "replace")
                else jax.numpy.asarray(arrays[path]),
            )
        )
    return nnx.from_flat_state(leaves)


def reference_buffers(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The deprecated buffers of the reference ``Model`` with the values it gives them
    (needed for a strict ``load_state_dict``)."""
    out: dict[str, np.ndarray] = {}
    pt = cfg.rope_seq_len
    out["var"] = np.ones((pt * pt, cfg.patch_dim), np.float32)
    n = pt * pt + cfg.txt_size
    for i, layers in enumerate(cfg.layers_per_block):
        if layers > 0:
            out[f"blocks.{i}.attn_mask"] = np.tril(np.ones((n, n), np.float32))
    if cfg.rope:
        rows = pt * pt + cfg.txt_size
        out["feat_rope.freqs_cos"] = np.zeros((rows, cfg.head_dim), np.float32)
        out["feat_rope.freqs_sin"] = np.zeros((rows, cfg.head_dim), np.float32)
    return out


def load_reference_model(cfg: ModelConfig, source, *, report: list | None = None):
    """A ``StarFlow`` for ``cfg`` holding the weights of a reference state dict.

    ``source`` is a mapping of reference names to arrays (NumPy, JAX or torch tensors)
    or a path to a ``.pth`` / ``.safetensors`` file. No random initialisation happens:
    the model is built abstractly and filled."""
    if not isinstance(source, Mapping):
        source = load_torch_file(source)
    abstract = nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, from_reference(state, source, report=report))
