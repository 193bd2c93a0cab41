"""A training run's workdir: its lock, its config, what a resumed run may change, and the
metrics rows a resume replays (the layout: ``workdir.layout``).

A workdir may lie on object storage (``gs://bucket/run``: ``starflow_jax.storage``); there it
is not locked (see WorkdirLock).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time

import jax

from starflow_jax import storage
from starflow_jax.config import with_defaults
from starflow_jax.config.training import SECTIONS
from starflow_jax.workdir.layout import (
    CHECKPOINTS,
    CONFIG,
    CONFIG_HISTORY,
    IMPORTED_INTEGRITY,
    IMPORTED_PARAMS,
    METRICS,
    WORKDIR_ENTRIES,
    config_json,
)

# model settings that change how the model computes, not its parameters: a resumed run may change them
COMPUTE_ONLY = ("dtype", "attention_impl", "attention_block")
# settings that tools write into a workdir's config.json after its run began (`bench jacobi
# --save`): a rerun whose command leaves one at its default keeps the workdir's value
SAVED_BY_TOOLS = ("sample.jacobi_blocks",)
# what `train --overwrite` discards (an imported workdir's params/ stay: they are the run's start)
DISCARDED = tuple(e for e in WORKDIR_ENTRIES if e not in (IMPORTED_PARAMS, IMPORTED_INTEGRITY))


class WorkdirError(ValueError):
    pass


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class WorkdirLock:
    """An exclusive lock on a workdir for one run (``.lock.<process>``, ``flock``: released
    by the kernel when the process dies, so a killed run never leaves a stale lock).

    A workdir on object storage (``gs://...``) is not locked: an object store has no lock
    that a killed process releases, so two runs started on one such workdir are not
    stopped from writing into it together; start one run per workdir there."""

    def __init__(self, workdir: pathlib.Path):
        import fcntl

        self.fd = None
        if not storage.is_local(workdir):
            return
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / f".lock.{jax.process_index()}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = pathlib.Path(self.path).read_text().strip() or "another process"
            os.close(self.fd)
            raise WorkdirError(
                f"{workdir} is in use by another run ({holder}); wait for it to finish or stop it, "
                "or choose another --workdir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def model_differences(old: dict, new: dict, ignore=COMPUTE_ONLY, prefix: str = "model.") -> list[str]:
    """The model settings (but ``ignore``) in which two configs differ, each as
    ``<prefix>key: <old> there, <new> here``."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [
        f"{prefix}{k}: {old.get(k)!r} there, {new.get(k)!r} here"
        for k in keys
        if _norm(old.get(k)) != _norm(new.get(k))
    ]


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def config_conflicts(old: dict, new: dict, has_checkpoints: bool) -> list[str]:
    """Why a run in a workdir written with config ``old`` cannot continue with ``new``:
    another model or data, or (with checkpoints) a change of what the saved state holds."""
    out = model_differences(old.get("model", {}), new.get("model", {}))
    if "data" in old:  # a workdir made by `import` has no data section
        keys = sorted(set(old["data"]) | set(new.get("data", {})))
        out += [
            f"data.{k}: {old['data'].get(k)!r} there, {new.get('data', {}).get(k)!r} here"
            for k in keys
            if _norm(old["data"].get(k)) != _norm(new.get("data", {}).get(k))
        ]
    if has_checkpoints and "train" in old:
        was, now = float(old["train"].get("ema_decay", 0.0)) > 0, float(new["train"]["ema_decay"]) > 0
        if was != now:
            out.append(
                f"train.ema_decay: the checkpoints {'hold' if was else 'hold no'} EMA parameters "
                f"(ema_decay {old['train'].get('ema_decay')} there, {new['train']['ema_decay']} here)"
            )
    return out


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif _norm(a) != _norm(b):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def has_checkpoints(workdir) -> bool:
    """Whether ``checkpoints/`` holds a step. On object storage orbax writes a step in place
    and marks it complete last (``commit_success.txt``): a step killed before that is none."""
    ckpt = workdir / CHECKPOINTS
    if not ckpt.is_dir():
        return False
    steps = [p for p in ckpt.iterdir() if p.name.isdigit()]
    if storage.is_local(ckpt):
        return bool(steps)
    return any((p / "commit_success.txt").exists() for p in steps)


def keep_tool_settings(old: dict, config, log) -> None:
    """Into ``config`` (the command's), the ``SAVED_BY_TOOLS`` values of the workdir's config
    ``old`` where the command leaves them at their defaults (logged): resuming a run does not
    undo what `bench jacobi --save` wrote. A value the command sets is the one used."""
    for key in SAVED_BY_TOOLS:
        section, name = key.split(".")
        default = SECTIONS[section][name]
        saved = old.get(section, {}).get(name, default)
        if config[section][name] == default and saved != default:
            config[section][name] = saved
            log(
                f"{key} = {saved!r} kept from the workdir's config (written there after the run began); "
                "other policies given with --set replace it"
            )


def prepare(workdir, config, overwrite: bool, log) -> None:
    """Write the run's ``config.json`` (process 0; the others wait). A workdir whose run
    has another model or data is refused unless ``overwrite``, which discards that run's
    checkpoints, metrics and pictures (files the run did not write are kept). Other
    changes (more steps, another learning rate) are allowed; the replaced config is
    appended to ``config_history.jsonl``. Settings tools saved there are kept
    (``keep_tool_settings``); ``config`` is updated with them."""
    cfg_file = workdir / CONFIG
    # (keys added to the schema since that run was written take their defaults)
    old = with_defaults(json.loads(cfg_file.read_text())) if cfg_file.exists() else None
    if old is not None and not overwrite:
        keep_tool_settings(old, config, log)
    text = config_json(config)
    new = json.loads(text)
    saved = has_checkpoints(workdir)
    if old is not None and not overwrite:
        conflicts = config_conflicts(old, new, saved)
        if conflicts:
            raise WorkdirError(
                f"{workdir} holds a run with a different config ({'; '.join(conflicts)}); resume it "
                "with the same model and data, choose another --workdir, or pass --overwrite to "
                "discard it"
            )
    barrier("starflow_workdir_checked")
    if jax.process_index() == 0:
        if overwrite:
            for p in sorted({p for pattern in DISCARDED for p in workdir.glob(pattern)}):
                storage.remove(p)
        elif old is not None and old != new:
            changes = changed_keys(old, new)
            log("config changed since this workdir's last run: " + "; ".join(changes))
            storage.append_text(
                workdir / CONFIG_HISTORY,
                json.dumps(dict(replaced=time.strftime("%Y-%m-%dT%H:%M:%S"), config=old)) + "\n",
            )
        workdir.mkdir(parents=True, exist_ok=True)
        storage.replace_text(cfg_file, text)
    barrier("starflow_workdir_ready")


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):  # a row cut short by a kill: dropped
        return float("inf")


def truncate_metrics(workdir, step: int) -> int:
    """Drop the ``metrics.jsonl`` rows after ``step`` (a resumed run logs those steps
    again); returns how many were dropped. Process 0."""
    path = workdir / METRICS
    if jax.process_index() != 0 or not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _row_step(line) <= step]
    if len(keep) == len(lines):
        return 0
    storage.replace_text(path, "".join(line + "\n" for line in keep))
    return len(lines) - len(keep)
