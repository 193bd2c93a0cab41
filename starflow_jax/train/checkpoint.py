"""Orbax checkpoints of the train state and the data iterator's position."""
from __future__ import annotations

import pathlib

import orbax.checkpoint as ocp


def manager(directory: pathlib.Path, keep: int, every: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(int(every), 1),
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(directory.resolve(), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state, data_state: dict, force: bool = False) -> bool:
    return mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  data=ocp.args.JsonSave(data_state)), force=force)


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state):
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                    data=ocp.args.JsonRestore()))
    return out.state, out.data
