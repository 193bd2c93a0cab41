"""Sharding rules. Every parameter declares logical axes, one name per dimension, where it
is created (``nnx.Param(value, **logical_axes(*names))``; dense layers through
``layers.linear.dense(kernel_axes=..., bias_axes=...)``; the stacked layer axis
``"layers"`` is added by the ``nnx.vmap`` that stacks the layers). ``LOGICAL_RULES`` below,
the one table, maps each logical name to a mesh axis of ``(data, fsdp, tensor)``: dense
kernels are split FSDP-style over ``fsdp`` on one dimension and Megatron-style over
``tensor`` on the other (heads and MLP width); the stacked layer axis, norms and the
unsplit sides of projections stay whole. A dimension is split only when the mesh axis is
larger than 1 and divides it. Optimizer and EMA leaves shaped like a parameter keep its
``Param`` wrapper and metadata (optax and ``jax.tree.map`` rebuild it), so they get the
parameter's spec. A parameter without declared axes is an error, not a default. Batches
are split over ``(data, fsdp)``."""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from starflow_jax.tree_paths import path_name

BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (None: never split)
LOGICAL_RULES: dict[str, str | None] = {
    "layers": None,  # the stacked (scanned) layer axis
    "embed": "fsdp",  # the FSDP side of a dense kernel: its input, or a row-parallel kernel's output (model width)
    "heads": "tensor",  # attention heads x head_dim: qkv outputs, attention-output inputs
    "mlp": "tensor",  # the MLP's hidden width
    "features": None,  # unsplit sides of projections: outputs of in / out projections, biases of model width
    "positions": None,  # token positions of position tables and start tokens
    "norm": None,  # norm scales and offsets
}


def logical_axes(*names: str | None) -> dict:
    """The metadata declaring a parameter's logical axes, one name per dimension:
    ``nnx.Param(value, **logical_axes("embed", "mlp"))``. Flax keeps them as the variable's
    ``out_sharding``; ``eager_sharding=False``: nothing is placed when the variable is made
    (the names are not mesh axes; ``tree_shardings`` maps them)."""
    return dict(out_sharding=tuple(names), eager_sharding=False)


def declared_axes(variable: nnx.Variable, path=()) -> tuple:
    """The logical axes a parameter declares (its ``out_sharding`` metadata); an error
    naming its path when it declares none or a wrong number."""
    axes = variable.get_metadata().get("out_sharding")
    where = path_name(path) or type(variable).__name__
    shape = tuple(variable.get_value().shape)
    if not axes:
        raise ValueError(
            f"parameter {where} {shape} declares no logical axes: create it with "
            "nnx.Param(value, **parallel.rules.logical_axes(*names)) (names of LOGICAL_RULES, one per dimension)"
        )
    if len(axes) != len(shape):
        raise ValueError(f"parameter {where} {shape} declares {len(axes)} logical axes {tuple(axes)}")
    return tuple(axes)


def logical_spec(axes, shape: tuple[int, ...], mesh_shape: Mapping[str, int], where: str = "") -> P:
    """The ``PartitionSpec`` of an array of ``shape`` whose dimensions have the logical
    ``axes`` (``None``: never split), under ``LOGICAL_RULES`` on a mesh of ``mesh_shape``."""
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"{where}: logical axis {name!r} is not in parallel.rules.LOGICAL_RULES")
        mesh_axis = None if name is None else LOGICAL_RULES[name]
        size = mesh_shape.get(mesh_axis, 1) if mesh_axis else 1
        if size > 1 and dim % size == 0 and mesh_axis not in used:
            spec.append(mesh_axis)
            used.add(mesh_axis)
        else:
            spec.append(None)
    return P(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_specs(tree, mesh_shape: Mapping[str, int]):
    """``PartitionSpec`` for every array of a params / optimizer / train-state tree, same
    structure (``Variable`` wrappers kept): a variable's from its declared axes, plain
    arrays (step counters, optimizer counts, the RNG key) replicated."""

    def one(path, x):
        if not _is_variable(x):
            return P(*([None] * len(getattr(x, "shape", ()))))
        if not hasattr(x.get_value(), "shape"):
            return x  # no array inside (optax's MaskedNode for parameters another optimizer owns)
        spec = logical_spec(declared_axes(x, path), tuple(x.get_value().shape), mesh_shape, path_name(path))
        return jax.tree.map(lambda _: spec, x)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)


def tree_shardings(tree, mesh):
    """``NamedSharding`` for every array of a params / optimizer / train-state tree."""
    specs = tree_specs(tree, dict(mesh.shape))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


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
