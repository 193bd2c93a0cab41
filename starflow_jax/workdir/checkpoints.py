"""Orbax checkpoints of the train state and the data iterator's position, with an
integrity record (``workdir.integrity``): a state holding NaN or Inf is never saved, a
step that does not read back as saved is set aside and the previous one is used."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from starflow_jax import storage
from starflow_jax.workdir.integrity import (
    CheckpointUnreadable,
    fingerprints,
    first_line,
    non_finite_leaves,
    read_integrity,
    silence_abandoned_reads,
    verify,
)
from starflow_jax.workdir.layout import CHECKPOINTS, DATA_ITEM, INTEGRITY_ITEM, SET_ASIDE, STATE_ITEM


class NonFiniteState(ValueError):
    """A train state holding NaN or Inf: never saved."""


def manager(directory, keep: int, every: int) -> ocp.CheckpointManager:
    if int(keep) < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=max(int(every), 1),
        enable_async_checkpointing=True,
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(storage.for_orbax(directory), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state, data_state: dict, force: bool = False) -> bool:
    """Save ``state`` at ``step`` when the manager's interval (or ``force``) says so; a
    state holding NaN or Inf raises NonFiniteState and nothing is written."""
    if not (force or mgr.should_save(step)):
        return False
    sums, finite = fingerprints(state)
    if not finite:
        bad = non_finite_leaves(state)
        raise NonFiniteState(
            f"the state at step {step} holds NaN or Inf ({len(bad)} arrays, e.g. {bad[:3]}); not saved"
        )
    return mgr.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                DATA_ITEM: ocp.args.JsonSave(data_state),
                INTEGRITY_ITEM: ocp.args.JsonSave(sums),
            }
        ),
        force=True,
    )


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state):
    """``(state, data iterator state)`` of ``step``, verified; CheckpointUnreadable
    (one line naming the problem) when the step cannot be read back as saved."""
    where = f"checkpoint step {step} in {mgr.directory}"
    saved = read_integrity(mgr.directory, step)
    try:
        out = mgr.restore(
            step,
            args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardRestore(abstract_state), DATA_ITEM: ocp.args.JsonRestore()}
            ),
        )
    except Exception as e:  # noqa: BLE001 - TensorStore, metadata and structure errors alike
        silence_abandoned_reads()
        raise CheckpointUnreadable(f"{where} cannot be read: {first_line(e)}") from None
    verify(out[STATE_ITEM], None if saved is None else saved, where)
    return out[STATE_ITEM], out[DATA_ITEM]


def set_aside(workdir, step: int):
    """Move ``checkpoints/<step>`` to ``checkpoints_set_aside/<step>[.n]`` (process 0):
    out of the run, kept for the user."""
    src = workdir / CHECKPOINTS / str(step)
    dst_root = workdir / SET_ASIDE
    dst = dst_root / str(step)
    n = 1
    while dst.exists():
        dst, n = dst_root / f"{step}.{n}", n + 1
    if jax.process_index() == 0 and src.exists():
        dst_root.mkdir(parents=True, exist_ok=True)
        storage.move_tree(src, dst)
    return dst


def restore_newest_good(
    mgr: ocp.CheckpointManager, abstract_state, workdir, log, step: int | None = None, barrier=lambda name: None
):
    """The newest checkpoint that reads back as saved (``step``: that one, and the newer
    ones are set aside so that the run continues from it). Unreadable steps are reported
    and set aside, never deleted. Returns ``(step, state, data state)``, or
    ``(None, None, None)`` when no checkpoint is readable."""
    steps = sorted(mgr.all_steps(), reverse=True)
    moved = False
    if step is not None:
        if step not in steps:
            raise ValueError(f"--step {step}: no checkpoint at that step in {mgr.directory} (steps: {sorted(steps)})")
        for s in [s for s in steps if s > step]:
            log(f"--step {step}: the later checkpoint {s} is set aside to {set_aside(workdir, s)}")
            moved = True
        steps = [step]
    found = (None, None, None)
    for s in steps:
        try:
            state, data = restore(mgr, s, abstract_state)
        except CheckpointUnreadable as e:
            if step is not None:
                raise
            log(f"warning: {e}; set aside to {set_aside(workdir, s)}; trying the previous checkpoint")
            moved = True
            continue
        found = (s, state, data)
        break
    if moved:
        barrier("starflow_checkpoints_set_aside")
        mgr.reload()
    return found
