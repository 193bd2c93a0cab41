"""Checkpoint integrity: every array's fingerprint is saved with a checkpoint step and
checked when the step is read back; a state holding NaN or Inf is refused.

The fingerprint of an array is two wrapping 32-bit integer sums of its bits (plain and
position-weighted), computed on the devices where the array lives: exact, independent of
how the array is sharded, and a few bytes per array. A flipped byte in a saved array file
changes it; a truncated file fails to read. Either way the step is reported as unreadable
(CheckpointUnreadable, one line naming the step and the problem).
"""

from __future__ import annotations

import sys
import warnings

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from starflow_jax import storage
from starflow_jax.tree_paths import path_names
from starflow_jax.workdir.layout import INTEGRITY_ITEM, STATE_ITEM


class CheckpointUnreadable(ValueError):
    """A checkpoint step that cannot be read back as it was saved."""


def leaf_name(path) -> str:
    """``params/blocks/0/kernel`` for a pytree path (dict keys, attributes and indices;
    the ``value`` attribute of a variable dropped), the same for a restored dict."""
    parts = path_names(path)
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def _bits(a: jax.Array) -> jax.Array:
    if a.dtype == jnp.bool_:
        return a.astype(jnp.uint32)
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    size = a.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(a, jnp.uint32)
    if size == 2:
        return jax.lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.uint32)
    if size == 1:
        return jax.lax.bitcast_convert_type(a, jnp.uint8).astype(jnp.uint32)
    raise ValueError(f"no fingerprint for dtype {a.dtype}")


@jax.jit
def _fingerprints(leaves):
    out, finite = [], []
    for a in leaves:
        u = _bits(a).reshape(-1)
        pos = jax.lax.iota(jnp.uint32, u.shape[0]) + jnp.uint32(1)
        out.append(jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * pos, dtype=jnp.uint32)]))
        if jnp.issubdtype(a.dtype, jnp.inexact):
            finite.append(jnp.all(jnp.isfinite(a)))
    return out, (jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True))


def fingerprints(tree) -> tuple[dict[str, list[int]], bool]:
    """``({leaf name: [sum, weighted sum]}, all float leaves finite)`` of a pytree of arrays."""
    flat = [(leaf_name(p), a) for p, a in jax.tree_util.tree_flatten_with_path(tree)[0] if a is not None]
    sums, finite = _fingerprints([a for _, a in flat])
    sums = jax.device_get(sums)
    return {name: [int(s[0]), int(s[1])] for (name, _), s in zip(flat, sums)}, bool(finite)


def non_finite_leaves(tree) -> list[str]:
    """Names of the float leaves holding NaN or Inf (for error messages)."""
    return [
        leaf_name(p)
        for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]
        if a is not None and jnp.issubdtype(a.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(a)))
    ]


def silence_abandoned_reads() -> None:
    """After a failed restore, orbax's other pending reads of that step finish on their
    own, report to an event loop that is gone and are printed (hundreds of "Event loop is
    closed" tracebacks and "Exception ignored in <coroutine ...>"). The failure was already
    reported in one line: drop those reports (only those) from then on in this process."""
    if getattr(sys.excepthook, "_starflow_filter", False):
        return
    except_hook, unraisable_hook = sys.excepthook, sys.unraisablehook

    def abandoned(exc) -> bool:
        text = str(exc)
        return (
            isinstance(exc, RuntimeError) and "Event loop is closed" in text
        ) or "Encountered error while reading array index" in text

    def on_exception(kind, value, tb):
        if not abandoned(value):
            except_hook(kind, value, tb)

    def on_unraisable(info):
        if not abandoned(info.exc_value):
            unraisable_hook(info)

    on_exception._starflow_filter = True
    sys.excepthook, sys.unraisablehook = on_exception, on_unraisable
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


def first_line(e: BaseException) -> str:
    """The innermost cause's first line (TensorStore's own message, not orbax's wrapper
    with the whole store spec), at most 300 characters."""
    while (e.__cause__ or e.__context__) is not None and "See full TensorStore details" in str(e):
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def verify(tree, saved: dict | None, where: str) -> None:
    """Check a restored pytree against the saved fingerprints (those of its leaves) and
    for NaN / Inf; raise CheckpointUnreadable naming the first bad arrays."""
    sums, finite = fingerprints(tree)
    if saved is not None:
        bad = [k for k, v in sums.items() if k in saved and saved[k] != v]
        unknown = [k for k in sums if k not in saved]
        if bad:
            raise CheckpointUnreadable(
                f"{where}: {len(bad)} arrays differ from what was saved (e.g. {bad[:3]}): "
                "the files were changed or damaged"
            )
        if unknown:
            raise CheckpointUnreadable(f"{where}: arrays {unknown[:3]} have no saved fingerprint")
    if not finite:
        raise CheckpointUnreadable(f"{where}: arrays {non_finite_leaves(tree)[:3]} hold NaN or Inf")


def read_integrity(directory, step: int) -> dict | None:
    """The fingerprints saved with ``step`` (None for checkpoints written before they
    were); CheckpointUnreadable when the step lacks the files every restore needs."""
    root = storage.as_path(directory) / str(step)
    if not (root / STATE_ITEM / "_METADATA").exists():
        raise CheckpointUnreadable(
            f"checkpoint step {step} in {directory}: {STATE_ITEM}/_METADATA is missing "
            "(an incomplete or damaged checkpoint)"
        )
    path = root / INTEGRITY_ITEM
    if not path.exists():
        return None
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(storage.for_orbax(path))
    except Exception as e:  # noqa: BLE001 - any failure to read it is a damaged checkpoint
        raise CheckpointUnreadable(f"step {step}: its integrity record cannot be read ({first_line(e)})") from None


def newest_readable(directory, steps, read, log, step: int | None = None):
    """For commands that only read a workdir: ``read(step)`` of ``step`` (an error naming
    the problem when it fails) or of the newest step that reads back (each failure
    reported). Nothing is moved."""
    if step is not None:
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {directory} (steps: {sorted(steps)})")
        return step, read(step)
    errors = []
    for s in sorted(steps, reverse=True):
        try:
            out = read(s)
        except CheckpointUnreadable as e:
            errors.append(str(e))
            log(f"warning: {e}; using the previous checkpoint")
            continue
        return s, out
    raise CheckpointUnreadable(f"no readable checkpoint in {directory}: " + "; ".join(errors))
