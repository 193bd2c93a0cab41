"""Moving weights between this project's checkpoint directories and the reference's
formats (a torch ``.pth`` state dict, safetensors with the configuration as metadata).

A workdir holds ``config.json`` and either training checkpoints (``checkpoints/<step>``,
written by ``starflow-jax train``) or imported parameters (``params/``, written by
``starflow-jax import``)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import uuid

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from starflow_jax import storage
from starflow_jax.config import model_config, with_defaults
from starflow_jax.config.model_config import ModelConfig
from starflow_jax.config.reference_args import to_model_kwargs, to_yaml_arguments
from starflow_jax.interop.integrity import (
    CheckpointUnreadable,
    fingerprints,
    first_line,
    newest_readable,
    read_integrity,
    silence_abandoned_reads,
    verify,
)
from starflow_jax.interop.named_tensors import load_torch_file
from starflow_jax.interop.state_dict import from_reference, reference_buffers, to_reference
from starflow_jax.model import StarFlow

EXPORT_DTYPES = ("float32", "bfloat16")


class CheckpointError(ValueError):
    pass


def read_workdir_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    path = storage.as_path(workdir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{workdir} is not a starflow-jax workdir (no config.json)")
    # keys added to the schema since the run was written take their defaults
    return ml_collections.ConfigDict(with_defaults(json.loads(path.read_text())))


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
    imported = workdir / "params"
    ckpt_dir = workdir / "checkpoints"
    steps = []
    if ckpt_dir.is_dir():
        mgr = ocp.CheckpointManager(storage.for_orbax(ckpt_dir))
        steps = list(mgr.all_steps())
        if not steps and not imported.exists():
            raise CheckpointError(f"{ckpt_dir} holds no checkpoint")
    if steps:
        which = "ema" if ema else "params"
        if ema and not float(config.train.get("ema_decay", 0.0)) > 0:
            raise CheckpointError("--ema: this run kept no EMA (train.ema_decay = 0)")
        if imported.exists():
            log(
                f"{workdir}: reading the training checkpoints (the imported parameters in params/ were where "
                "that training started)"
            )

        def read(s):
            # only the parameters (or the EMA), not the optimizer state
            where = f"checkpoint step {s} in {ckpt_dir}"
            saved = read_integrity(ckpt_dir, s)
            item = {which: abstract_params}
            try:
                out = mgr.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeRestore(
                            item=item,
                            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                            partial_restore=True,
                        )
                    ),
                )
            except Exception as e:  # noqa: BLE001 - TensorStore, metadata and structure errors alike
                silence_abandoned_reads()
                raise CheckpointUnreadable(f"{where} cannot be read: {first_line(e)}") from None
            verify({which: out.state[which]}, saved, where)
            return out.state[which]

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
            {"params": params},
            json.loads(saved.read_text()) if saved.exists() else None,
            f"the imported parameters in {imported}",
        )
        return config, cfg, params
    raise CheckpointError(f"{workdir} holds neither checkpoints/ nor params/")


def model_from_workdir(workdir, step=None, ema=False) -> tuple[ml_collections.ConfigDict, StarFlow]:
    config, cfg, params = load_params(workdir, step, ema)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))))
    return config, nnx.merge(graphdef, params)


def export_arrays(cfg: ModelConfig, params, dtype: str = "float32", release: bool = False) -> dict[str, np.ndarray]:
    """Reference names to arrays (float32), deprecated buffers included; leaf by leaf
    (``release``: the parameters' device arrays are freed as they are converted)."""
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    out = to_reference(params, release=release)
    bad = sorted(k for k, v in out.items() if not np.all(np.isfinite(v)))
    if bad:
        raise CheckpointError(f"parameters hold NaN or Inf: {bad}")
    out.update(reference_buffers(cfg))
    for k in out:
        if out[k].dtype != np.float32:
            out[k] = np.ascontiguousarray(out[k], np.float32)
    return out


def _check_out(*paths: pathlib.Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless ``overwrite``, naming it."""
    for path in paths:
        if path.exists() and not overwrite:
            raise CheckpointError(f"{path} exists; pass --overwrite to replace it")


def export_outputs(path, fmt: str) -> list[pathlib.Path]:
    """The files an export to ``path`` writes: the checkpoint and, for safetensors, the
    reference YAML beside it (``<stem>.yaml``)."""
    path = pathlib.Path(path)
    if fmt != "safetensors":
        return [path]
    yaml_path = path.with_suffix(".yaml")
    if yaml_path == path:
        raise CheckpointError(
            f"{path}: a safetensors output cannot end in .yaml (its reference YAML is written beside it as <stem>.yaml)"
        )
    return [path, yaml_path]


def _write_atomically(writes: dict) -> None:
    """``{path: write}``: each ``write(tmp)`` fills a temporary file beside its ``path``; only
    when all have succeeded are they renamed into place, so that a failure never leaves a
    half-written output (nor one output new and the other old)."""
    tmps = {path: path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp") for path in writes}
    try:
        for path, write in writes.items():
            write(tmps[path])
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def write_torch(path, arrays: dict, dtype: str, overwrite: bool = False) -> None:
    path = pathlib.Path(path)
    _check_out(path, overwrite=overwrite)
    try:
        import torch
    except ImportError as e:
        raise CheckpointError("--format torch needs torch (pip install -e '.[torch]')") from e
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    # consumes ``arrays`` key by key: float32 tensors share the NumPy memory, bfloat16 ones
    # replace it, so at most one extra leaf is held at a time
    tensors = {}
    for k in list(arrays):
        t = torch.from_numpy(arrays.pop(k))
        tensors[k] = t.to(tdtype) if tdtype != torch.float32 else t
    _write_atomically({path: lambda tmp: torch.save(tensors, str(tmp))})


def write_safetensors(path, arrays: dict, cfg: ModelConfig, dtype: str, overwrite: bool = False) -> None:
    path = pathlib.Path(path)
    yaml_path = export_outputs(path, "safetensors")[1]
    _check_out(path, yaml_path, overwrite=overwrite)
    metadata = {
        "format": "starflow-jax",
        "model_kwargs": json.dumps(to_model_kwargs(cfg)),
        "reference_yaml": to_yaml_arguments(cfg),
        "txt_dim": str(cfg.txt_dim),
    }
    if dtype == "bfloat16":
        try:
            import torch
            from safetensors.torch import save_file
        except ImportError as e:
            raise CheckpointError("bfloat16 safetensors need torch (pip install -e '.[torch]')") from e
        tensors = {}
        for k in list(arrays):  # key by key, as in write_torch
            tensors[k] = torch.from_numpy(arrays.pop(k)).to(torch.bfloat16)
    else:
        from safetensors.numpy import save_file

        tensors = arrays
    _write_atomically(
        {
            path: lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
            yaml_path: lambda tmp: tmp.write_text(to_yaml_arguments(cfg)),
        }
    )


def import_reference(
    source: str | pathlib.Path, config: ml_collections.ConfigDict, out: str | pathlib.Path, overwrite: bool = False
) -> list[str]:
    """A reference state dict into a workdir (``config.json`` + ``params/``); returns the
    deprecated buffers that were ignored.

    The state dict is read and checked first; the workdir is then written to a staging
    directory beside ``out`` and moved in at the very end, so that a failure leaves ``out``
    as it was. A non-empty ``out`` needs ``overwrite``, which replaces what a workdir holds
    (``WORKDIR_ENTRIES``) and keeps any other file there."""
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
    cfg = model_config(config)
    sd = load_torch_file(source)
    abstract = nnx.state(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    ignored: list[str] = []
    params = from_reference(abstract, sd, report=ignored)
    target = out.resolve()  # (a symlinked workdir: its target)
    staging = target.parent / f".{target.name}.import-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        (staging / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(staging / "params", params)
        ckpt.wait_until_finished()
        (staging / IMPORTED_INTEGRITY).write_text(json.dumps(fingerprints({"params": params})[0]))
        _move_in(staging, target)
    except OSError as e:
        raise CheckpointError(f"cannot write the workdir {out}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ignored


# What a workdir holds (``starflow-jax train`` and ``import``): all that ``import --overwrite``
# and ``train --overwrite`` replace; other files in the directory stay.
IMPORTED_INTEGRITY = "params.integrity.json"  # the imported parameters' fingerprints
WORKDIR_ENTRIES = (
    "config.json",
    "params",
    IMPORTED_INTEGRITY,
    "checkpoints",
    "checkpoints_set_aside",
    "config_history.jsonl",
    "metrics.jsonl",
    "tensorboard",
    "result.json",
    "samples*.png",
)


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
