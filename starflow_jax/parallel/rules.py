"""Sharding rules: every parameter (and every optimizer / EMA leaf shaped like one) gets a
``PartitionSpec`` from its path. Dense kernels ``(in, out)`` are split FSDP-style over
``fsdp`` on one dimension and Megatron-style over ``tensor`` on the other (heads and MLP
width); the stacked layer axis is never split; a dimension is split only when the axis
size divides it. Batches are split over ``(data, fsdp)``."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
# kernels whose output dimension carries heads / MLP width (column-parallel)
COLUMN = ("qkv", "fc1", "gate_proj", "up_proj")
# kernels whose input dimension carries heads / MLP width (row-parallel)
ROW = ("proj", "fc2", "down_proj")


def _names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return out


def _fits(dim: int, mesh, axis: str) -> bool:
    return mesh.shape[axis] > 1 and dim % mesh.shape[axis] == 0


def param_spec(path, shape: tuple[int, ...], mesh) -> P:
    names = _names(path)
    if not shape:
        return P()
    stacked = "attn_blocks" in names
    lead = (None,) if stacked else ()
    core = shape[1:] if stacked else shape
    owner = next((n for n in reversed(names) if n not in ("kernel", "bias", "value", "weight", "mu", "nu")), "")
    leaf = next((n for n in reversed(names) if n in ("kernel", "bias", "weight")), "")
    spec: list = [None] * len(core)
    if leaf == "kernel" and len(core) == 2:
        if owner in COLUMN:
            spec = [
                "fsdp" if _fits(core[0], mesh, "fsdp") else None,
                "tensor" if _fits(core[1], mesh, "tensor") else None,
            ]
        elif owner in ROW:
            spec = [
                "tensor" if _fits(core[0], mesh, "tensor") else None,
                "fsdp" if _fits(core[1], mesh, "fsdp") else None,
            ]
        else:
            spec = ["fsdp" if _fits(core[0], mesh, "fsdp") else None, None]
    elif leaf == "bias" and len(core) == 1 and owner in COLUMN:
        spec = ["tensor" if _fits(core[0], mesh, "tensor") else None]
    return P(*lead, *spec)


def tree_shardings(tree, mesh):
    """``NamedSharding`` for every leaf of a params / optimizer / train-state tree."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, param_spec(path, tuple(getattr(leaf, "shape", ())), mesh)), tree
    )


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def constrain_batch(x: jax.Array) -> jax.Array:
    """Keep an activation split along its batch axis over ``(data, fsdp)`` when a mesh is
    set (``jax.set_mesh``; a no-op without one, or when the batch does not divide). Without
    it the partitioner may all-gather the batch to meet FSDP-sharded weights on their
    contracting dimension, instead of all-gathering the weights."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(a in mesh.axis_names for a in BATCH_AXES):
        return x
    size = mesh.shape["data"] * mesh.shape["fsdp"]
    if size == 1 or x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))
