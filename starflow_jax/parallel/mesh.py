"""The device mesh: named axes ``(data, fsdp, tensor)``; sizes from the config, one of them
may be ``-1`` (all remaining devices)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")


def mesh_shape(sizes: dict | tuple, num_devices: int) -> tuple[int, int, int]:
    if isinstance(sizes, dict):
        unknown = sorted(set(sizes) - set(AXES))
        if unknown:
            raise ValueError(f"unknown mesh axes {unknown}; the axes are {AXES}")
        sizes = tuple(int(sizes.get(a, 1)) for a in AXES)
    sizes = list(sizes)
    if len(sizes) != 3:
        raise ValueError(f"a mesh has 3 axes {AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not fit {num_devices} devices")
    if -1 in sizes:
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} uses {math.prod(sizes)} devices, there are {num_devices}")
    return tuple(sizes)


def make_mesh(sizes: dict | tuple = (-1, 1, 1), devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def check_batch_split(batch: int, grad_accum: int, mesh: Mesh, batch_name: str, accum_name: str) -> None:
    """A global batch must split into ``grad_accum`` micro-batches, each divisible by the
    mesh's ``data x fsdp`` (the axes the batch is sharded over)."""
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if grad_accum == 1 and batch % split:
        raise ValueError(f"{batch_name}={batch} is not divisible by the mesh's data x fsdp = {split}")
    if batch % grad_accum or (batch // grad_accum) % split:
        raise ValueError(
            f"{batch_name}={batch} must split into {accum_name} {grad_accum} micro-batches each "
            f"divisible by the mesh's data x fsdp = {split}"
        )
