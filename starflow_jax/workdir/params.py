"""The parameters of a workdir: read back (the newest readable training checkpoint's
parameters or EMA, else the imported ones) for sampling, export and fine-tuning, and
written as an imported workdir (``config.json`` + ``params/`` + their fingerprints) for
``starflow-jax import``."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import uuid

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from starflow_jax import storage
from starflow_jax.config import model_config
from starflow_jax.model import StarFlow
from starflow_jax.workdir.integrity import (
    CheckpointUnreadable,
    fingerprints,
    first_line,
    newest_readable,
    read_integrity,
    silence_abandoned_reads,
    verify,
)
from starflow_jax.workdir.layout import (
    CHECKPOINTS,
    CONFIG,
    EMA_KEY,
    IMPORTED_INTEGRITY,
    IMPORTED_PARAMS,
    PARAMS_KEY,
    STATE_ITEM,
    WORKDIR_ENTRIES,
    CheckpointError,
    config_json,
    read_workdir_config,
)


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_params(workdir: str | pathlib.Path, step: int | None = None, ema: bool = False, log=_warn):
    """``(config, ModelConfig, params state)`` of a workdir: its newest readable training
    checkpoint (or ``step``), else the parameters ``starflow-jax import`` wrote. Every
    array is checked against the fingerprints saved with it; an unreadable newest step is
    reported through ``log`` and the previous one is used (an explicit ``step`` that
    cannot be read is an error naming the problem). ``workdir`` may be on object storage
    (``gs://...``)."""
    workdir = storage.as_path(workdir)
    config = read_workdir_config(workdir)
    cfg = model_config(config)
    abstract_model = nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0)))
    # restored whole onto this process's first device, whatever topology saved it (a run
    # sharded over many hosts exports / samples / fine-tunes on one machine)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), nnx.state(abstract_model, nnx.Param)
    )
    imported = workdir / IMPORTED_PARAMS
    ckpt_dir = workdir / CHECKPOINTS
    steps = []
    if ckpt_dir.is_dir():
        mgr = ocp.CheckpointManager(storage.for_orbax(ckpt_dir))
        steps = list(mgr.all_steps())
        if not steps and not imported.exists():
            raise CheckpointError(f"{ckpt_dir} holds no checkpoint")
    if steps:
        which = EMA_KEY if ema else PARAMS_KEY
        if ema and not float(config.train.get("ema_decay", 0.0)) > 0:
            raise CheckpointError("--ema: this run kept no EMA (train.ema_decay = 0)")
        if imported.exists():
            log(
                f"{workdir}: reading the training checkpoints (the imported parameters in params/ were where "
                "that training started)"
            )

        def read(s):
            # only the parameters (or the EMA) of the train state, not the optimizer state
            where = f"checkpoint step {s} in {ckpt_dir}"
            saved = read_integrity(ckpt_dir, s)
            item = {which: abstract_params}
            restore = ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
            )
            try:
                out = mgr.restore(s, args=ocp.args.Composite(**{STATE_ITEM: restore}))
            except Exception as e:  # noqa: BLE001 - TensorStore, metadata and structure errors alike
                silence_abandoned_reads()
                raise CheckpointUnreadable(f"{where} cannot be read: {first_line(e)}") from None
            tree = out[STATE_ITEM][which]
            verify({which: tree}, saved, where)
            return tree

        _, params = newest_readable(ckpt_dir, steps, read, log, step)
        return config, cfg, params
    if imported.exists():
        if step is not None or ema:
            raise CheckpointError("an imported workdir holds one set of parameters: no --step / --ema")
        try:
            params = ocp.StandardCheckpointer().restore(storage.for_orbax(imported), abstract_params)
        except Exception as e:  # noqa: BLE001
            silence_abandoned_reads()
            raise CheckpointUnreadable(
                f"the imported parameters in {imported} cannot be read: {first_line(e)}"
            ) from None
        saved = workdir / IMPORTED_INTEGRITY
        verify(
            {PARAMS_KEY: params},
            json.loads(saved.read_text()) if saved.exists() else None,
            f"the imported parameters in {imported}",
        )
        return config, cfg, params
    raise CheckpointError(f"{workdir} holds neither checkpoints/ nor params/")


def model_from_workdir(workdir, step=None, ema=False) -> tuple[ml_collections.ConfigDict, StarFlow]:
    config, cfg, params = load_params(workdir, step, ema)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))))
    return config, nnx.merge(graphdef, params)


def check_import_target(out: str | pathlib.Path, overwrite: bool) -> pathlib.Path:
    """``out`` as a local path that an imported workdir may be written to: a missing or
    empty directory, or with ``overwrite`` a directory whose workdir entries are replaced."""
    if not storage.is_local(out):
        raise CheckpointError(
            f"--out {out}: import writes a local workdir; copy it to object storage afterwards "
            "(e.g. gcloud storage cp -r)"
        )
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; pass --overwrite to replace it")
    return out


def write_imported(out: pathlib.Path, config: ml_collections.ConfigDict, params) -> None:
    """An imported workdir: ``config.json``, ``params/`` and their fingerprints, written to
    a staging directory beside ``out`` and moved in at the very end, so that a failure
    leaves ``out`` as it was. What a workdir holds there (``WORKDIR_ENTRIES``) is replaced;
    any other file stays."""
    target = out.resolve()  # (a symlinked workdir: its target)
    staging = target.parent / f".{target.name}.import-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        (staging / CONFIG).write_text(config_json(config))
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(staging / IMPORTED_PARAMS, params)
        ckpt.wait_until_finished()
        (staging / IMPORTED_INTEGRITY).write_text(json.dumps(fingerprints({PARAMS_KEY: params})[0]))
        _move_in(staging, target)
    except OSError as e:
        raise CheckpointError(f"cannot write the workdir {out}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_in(staging: pathlib.Path, out: pathlib.Path) -> None:
    """The workdir written in ``staging`` to ``out``: a missing or empty ``out`` is replaced
    by it; otherwise the entries a workdir owns are moved aside into ``staging`` and the new
    ones moved in (on a failure, moved back)."""
    if not out.exists() or not any(out.iterdir()):
        os.replace(staging, out)
        return
    old = staging / ".replaced"
    old.mkdir()
    new = sorted(p for p in staging.iterdir() if p != old)
    owned = sorted({p for pattern in WORKDIR_ENTRIES for p in out.glob(pattern)})
    moved_old, moved_new = [], []
    try:
        for p in owned:
            os.replace(p, old / p.name)
            moved_old.append(p.name)
        for p in new:
            os.replace(p, out / p.name)
            moved_new.append(p.name)
    except OSError:
        for name in moved_new:
            os.replace(out / name, staging / name)
        for name in moved_old:
            os.replace(old / name, out / name)
        raise
