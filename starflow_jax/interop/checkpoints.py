"""Moving weights between this project's checkpoint directories and the reference's
formats (a torch ``.pth`` state dict, safetensors with the configuration as metadata).

A workdir holds ``config.json`` and either training checkpoints (``checkpoints/<step>``,
written by ``starflow-jax train``) or imported parameters (``params/``, written by
``starflow-jax import``)."""
from __future__ import annotations

import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from starflow_jax.config import model_config
from starflow_jax.config.model_config import ModelConfig
from starflow_jax.config.reference_args import to_model_kwargs, to_yaml_arguments
from starflow_jax.interop.state_dict import (from_reference, load_torch_file, reference_buffers, to_reference)
from starflow_jax.model import StarFlow

EXPORT_DTYPES = ("float32", "bfloat16")


class CheckpointError(ValueError):
    pass


def read_workdir_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{workdir} is not a starflow-jax workdir (no config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_params(workdir: str | pathlib.Path, step: int | None = None, ema: bool = False):
    """``(config, ModelConfig, params state)`` of a workdir's checkpoint (latest by default)."""
    workdir = pathlib.Path(workdir)
    config = read_workdir_config(workdir)
    cfg = model_config(config)
    abstract_model = nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0)))
    # restored whole onto this process's first device, whatever topology saved it (a run
    # sharded over many hosts exports / samples / fine-tunes on one machine)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                                   nnx.state(abstract_model, nnx.Param))
    imported = workdir / "params"
    if (workdir / "checkpoints").exists():
        mgr = ocp.CheckpointManager((workdir / "checkpoints").resolve())
        steps = mgr.all_steps()
        if not steps:
            raise CheckpointError(f"{workdir / 'checkpoints'} holds no checkpoint")
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} in {workdir / 'checkpoints'} (steps: {sorted(steps)})")
        which = "ema" if ema else "params"
        if ema and not float(config.train.get("ema_decay", 0.0)) > 0:
            raise CheckpointError("--ema: this run kept no EMA (train.ema_decay = 0)")
        # restore only the parameters (or the EMA), not the optimizer state
        item = {which: abstract_params}
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        return config, cfg, out.state[which]
    if imported.exists():
        if step is not None or ema:
            raise CheckpointError("an imported workdir holds one set of parameters: no --step / --ema")
        params = ocp.StandardCheckpointer().restore(imported.resolve(), abstract_params)
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


def _check_out(path: pathlib.Path, overwrite: bool):
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} exists; pass --overwrite to replace it")


def write_torch(path, arrays: dict, dtype: str, overwrite: bool = False) -> None:
    path = pathlib.Path(path)
    _check_out(path, overwrite)
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
    torch.save(tensors, str(path))


def write_safetensors(path, arrays: dict, cfg: ModelConfig, dtype: str, overwrite: bool = False) -> None:
    path = pathlib.Path(path)
    _check_out(path, overwrite)
    metadata = {"format": "starflow-jax", "model_kwargs": json.dumps(to_model_kwargs(cfg)),
                "reference_yaml": to_yaml_arguments(cfg), "txt_dim": str(cfg.txt_dim)}
    if dtype == "bfloat16":
        try:
            import torch
            from safetensors.torch import save_file
        except ImportError as e:
            raise CheckpointError("bfloat16 safetensors need torch (pip install -e '.[torch]')") from e
        tensors = {}
        for k in list(arrays):  # key by key, as in write_torch
            tensors[k] = torch.from_numpy(arrays.pop(k)).to(torch.bfloat16)
        save_file(tensors, str(path), metadata=metadata)
    else:
        from safetensors.numpy import save_file
        save_file(arrays, str(path), metadata=metadata)
    path.with_suffix(".yaml").write_text(to_yaml_arguments(cfg))


def import_reference(source: str | pathlib.Path, config: ml_collections.ConfigDict, out: str | pathlib.Path,
                     overwrite: bool = False) -> list[str]:
    """A reference state dict into a workdir (``config.json`` + ``params/``); returns the
    deprecated buffers that were ignored."""
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    cfg = model_config(config)
    sd = load_torch_file(source)
    abstract = nnx.state(nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    ignored: list[str] = []
    params = from_reference(abstract, sd, report=ignored)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((out / "params").resolve(), params)
    ckpt.wait_until_finished()
    return ignored
